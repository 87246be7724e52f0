"""One agent session: its env, its client, its episodes; reports each episode as it ends."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from env_agents.client import AsyncAgentClient
from env_agents.control.controller import Controller
from env_agents.control.tracer import Tracer
from env_agents.envs import EnvAdapter, make_adapter
from env_agents.runner.spec import RunSpec

log = logging.getLogger("vlmq.agents")
Emit = Callable[[str, Any], None]


def make_session_adapter(spec: RunSpec, index: int) -> EnvAdapter:
    adapter = make_adapter(spec.env_id, seed=spec.episode_seed(index, 0), size=spec.size, **spec.env_options)
    adapter.share(index, spec.n)
    return adapter


async def run_session(
    spec: RunSpec, index: int, adapter: EnvAdapter, redis, emit: Emit, tracer: Optional[Tracer] = None
) -> None:
    """Run the session's episodes; closes the adapter at the end."""
    session = spec.session_id(index)
    tracer = tracer or Tracer()
    client = AsyncAgentClient(session, redis=redis, settings=spec.broker, raise_on_error=False)
    tracer.session_start(session)
    try:
        await client.start()
        if spec.task == "preference":
            from env_agents.preference.labelling import label_episode

            for ep in range(spec.episodes):
                rows, stats = await label_episode(
                    spec, adapter, client, session, ep, spec.episode_seed(index, ep)
                )
                emit("preference", rows)
                emit("episode", stats.to_dict(include_latencies=True))
            return
        controller = Controller(session, adapter, client, spec.control, tracer)
        for ep in range(spec.episodes):
            stats = await controller.run_episode(ep, spec.episode_seed(index, ep))
            emit("episode", stats.to_dict(include_latencies=True))
    finally:
        tracer.session_end(session)
        await client.close()
        adapter.close()
