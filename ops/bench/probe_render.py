"""One MiniWorld-OneRoom-v0 env at 224 px: which GL renderer draws it and how many steps/s one
process gets. A check on the device machine before gpu_agents.sh; needs only miniworld."""

from __future__ import annotations

import time


def main(seconds: float = 3.0) -> None:
    import pyglet

    pyglet.options["headless"] = True  # before miniworld opens a display
    import gymnasium as gym
    import miniworld  # noqa: F401  (registers the ids)
    from pyglet.gl import gl_info

    env = gym.make("MiniWorld-OneRoom-v0", obs_width=224, obs_height=224)
    env.reset(seed=0)
    print("renderer", gl_info.get_renderer())
    t0, n = time.time(), 0
    while time.time() - t0 < seconds:
        _, _, done, cut, _ = env.step(env.action_space.sample())
        n += 1
        if done or cut:
            env.reset()
    print(f"{n / seconds:.0f} steps/s in one process")


if __name__ == "__main__":
    main()
