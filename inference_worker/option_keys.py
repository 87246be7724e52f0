"""Every `vlmq worker --option KEY=VALUE` key, by the component that reads it: a key no
component reads is refused at start (a typo would otherwise be silently ignored)."""

from __future__ import annotations

from dataclasses import fields
from typing import Dict, Mapping

VLA_KEYS = ("vla", "vla_cache", "vla_sessions", "vla_ttl_s", "vla_steps", "vla_cuda_graphs")
SELF_CHECK_KEYS = ("self_check", "self_check_tol")
FAULT_KEYS = ("fault_kill_on", "fault_device_assert_on", "fault_oom_over")  # the synthetic backend
VLLM_KEYS = (
    "vllm_gpu_memory_utilization",
    "vllm_max_model_len",
    "vllm_kv_cache_mib",
    "vllm_enforce_eager",
    "vllm_tensor_parallel_size",
    "vllm_images_per_prompt",
)


def known_keys() -> Dict[str, str]:
    from inference_worker.engines.options import EngineOptions

    keys = {f.name: "engine" for f in fields(EngineOptions)}
    keys.update({k: "VLA" for k in VLA_KEYS})
    keys.update({k: "vLLM" for k in VLLM_KEYS})
    keys.update({k: "self-check" for k in SELF_CHECK_KEYS})
    keys.update({k: "synthetic backend" for k in FAULT_KEYS})
    return keys


def check_option_keys(options: Mapping[str, str]) -> None:
    """Raise ValueError naming the unknown keys and the known ones."""
    known = known_keys()
    unknown = sorted(k for k in options if k.replace("-", "_") not in known)
    if unknown:
        raise ValueError(
            f"unknown --option key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
