"""One MiniWorld-OneRoom-v0 env at 224 px: which GL renderer draws it and how many steps/s one
process gets (a check on the device machine before gpu_agents.sh; needs only miniworld)."""

import time, pyglet
pyglet.options["headless"] = True
import gymnasium as gym, miniworld  # noqa
env = gym.make("MiniWorld-OneRoom-v0", obs_width=224, obs_height=224)
env.reset(seed=0)
from pyglet.gl import gl_info
print("renderer", gl_info.get_renderer())
t = time.time(); n = 0
while time.time() - t < 3:
    _, _, a, b, _ = env.step(env.action_space.sample()); n += 1
    if a or b: env.reset()
print(f"{n / 3:.0f} steps/s in one process")
