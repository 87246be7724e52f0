"""The client side: AgentClient, async control, env adapters, the multi-process runner.

Imports `schemas` and `broker` only: never torch.
"""

from env_agents.client import AgentClient, AsyncAgentClient, ReplyError

__all__ = ["AgentClient", "AsyncAgentClient", "ReplyError"]
