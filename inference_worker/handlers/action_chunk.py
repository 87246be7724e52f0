"""`action_chunk`: VLA chunks from the newest frame, with a per-session feature cache.

A batch holds requests of many sessions. Per batch: decode the frames, encode in one VLM
pass only the frames not already cached (normally one per request), assemble each
request's context (t-4, t-2, t; see inference_worker/vla/cache.py for how steps align),
and sample every chunk together with batched Euler steps; requests that carry a
previous chunk get real-time-chunking guidance (rows without one are unaffected). Two
requests of one session in one batch run in step order, in successive rounds, so the
later one sees the earlier one's frame.

Options (`vlmq worker --option KEY=VALUE`, or the VLMQ_* variable; VLAOptions in
inference_worker/settings.py):
  vla=DIR                 the VLA folder (VLMQ_VLA); serving action_chunk needs it
  vla_cache=features      features: cache VLM features; frames: cache decoded frames and
                          re-encode all of a request's frames (the no-cache baseline) (VLMQ_VLA_CACHE)
  vla_sessions=1024       sessions kept in the cache, least recently used evicted (VLMQ_VLA_SESSIONS)
  vla_ttl_s=600           a session idle this long is dropped (VLMQ_VLA_TTL_S)
  vla_steps=N             Euler steps (default: the VLA's config) (VLMQ_VLA_STEPS)
  vla_cuda_graphs=1       on CUDA, replay the expert's Euler steps, and the VLM feature pass of
                          up to 64 frames, as CUDA graphs, one per batch bucket, all captured
                          at warm-up (VLMQ_VLA_CUDA_GRAPHS)
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from inference_worker.engines.decoder import BUCKETS
from inference_worker.engines.upload import upload
from inference_worker.handlers.base import Handler, HandlerOutput
from inference_worker.settings import VLAOptions
from inference_worker.timing import Stopwatch
from inference_worker.vla.cache import FeatureCache
from inference_worker.vla.config import VLAConfig
from inference_worker.vla.graphs import GraphedSampler
from inference_worker.vla.model import QwenVLA
from inference_worker.vla.projector import pack_frames
from inference_worker.vla.rtc import Guidance, guidance_weights
from schemas.errors import ErrorCode, ProtocolError
from schemas.images import decode_image
from schemas.limits import DEFAULT_LIMITS, Limits
from schemas.messages import ActionChunkRequest, ActionChunkResult

CACHE_MODES = ("features", "frames")
MAX_GRAPH_BATCH = 64  # batches up to this replay captured graphs (feature pass and expert)
log = logging.getLogger("vlmq.vla")


class ActionChunkHandler(Handler):
    kind = "action_chunk"

    def __init__(
        self,
        vla: QwenVLA,
        cache_mode: str = "features",
        max_sessions: int = 1024,
        ttl_s: float = 600.0,
        limits: Limits = DEFAULT_LIMITS,
        cuda_graphs: bool = True,
    ) -> None:
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"vla_cache must be one of {CACHE_MODES}, got {cache_mode!r}")
        self.vla = vla
        self.cfg = vla.config
        self.cache_mode = cache_mode
        self.limits = limits
        self.cache: FeatureCache[Any] = FeatureCache(
            self.cfg.num_frames, self.cfg.frame_skip, max_sessions=max_sessions, ttl_s=ttl_s
        )
        if vla.device.type == "cuda" and vla.extractor is not None and vla.extractor.dtype != torch.float32:
            # serve the expert in the VLM's half precision: autocast would re-cast every fp32
            # weight on every Euler step (its cast cache does not survive graph capture)
            vla.expert.to(vla.extractor.dtype)
        vla.expert.serve()
        self.graphs: Optional[GraphedSampler] = None
        if cuda_graphs and vla.device.type == "cuda":
            self.graphs = GraphedSampler(vla.expert, self.cfg.num_steps)
            if vla.extractor is not None:
                vla.extractor.use_cuda_graphs(MAX_GRAPH_BATCH)

    # ------------------------------------------------------------------ serving

    def warmup(self) -> None:
        """Run every path once; with CUDA graphs, every batch bucket in the steady state (a
        full context of cached frames), so serving never pays a graph capture."""
        frame = np.zeros((self.cfg.image_size, self.cfg.image_size, 3), np.uint8)
        sizes = [b for b in BUCKETS if b <= MAX_GRAPH_BATCH] if self.graphs is not None else [1]
        sessions = [f"vlmq-warmup-{i}" for i in range(max(sizes))]
        for b in sizes:
            for k in range(self.cfg.num_frames):
                step = k * self.cfg.frame_skip
                self.run(
                    [
                        ActionChunkRequest(session_id=s, step=step, image=frame, noise_seed=0)
                        for s in sessions[:b]
                    ]
                )
            for s in sessions[:b]:
                self.cache.reset(s)

    def run(self, requests: Sequence[ActionChunkRequest]) -> HandlerOutput:
        sw = Stopwatch()
        results: List[Any] = [None] * len(requests)
        frames: Dict[int, np.ndarray] = {}
        with sw("decode"):
            for i, req in enumerate(requests):
                try:
                    self._validate(req)
                    frames[i] = decode_image(req.image, self.limits)
                except ProtocolError as exc:
                    results[i] = exc
        for group in _rounds([i for i in range(len(requests)) if i in frames], requests):
            self._run_round([(i, requests[i], frames[i]) for i in group], results, sw)
        return HandlerOutput(results, sw.timings)

    def _validate(self, req: ActionChunkRequest) -> None:
        c = self.cfg
        try:
            self.vla.extractor.check_instruction(req.instruction)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.INVALID, f"instruction: {exc}") from None
        if req.state is not None and req.state.shape != (c.state_dim,):
            want = f"shape ({c.state_dim},)" if c.state_dim else "none (this VLA takes no state)"
            raise ProtocolError(ErrorCode.INVALID, f"state: expected {want}, got {tuple(req.state.shape)}")
        if req.prev_chunk is not None:
            rows, dim = req.prev_chunk.shape
            if dim != c.action_dim or rows < 1:
                raise ProtocolError(
                    ErrorCode.INVALID,
                    f"prev_chunk: expected (rows, {c.action_dim}), got {tuple(req.prev_chunk.shape)}",
                )
            if req.inference_delay > rows:
                raise ProtocolError(
                    ErrorCode.INVALID,
                    f"inference_delay {req.inference_delay} is longer than prev_chunk ({rows} rows)",
                )
        elif req.inference_delay:
            raise ProtocolError(ErrorCode.INVALID, "inference_delay needs prev_chunk")

    def _run_round(self, items, results: List[Any], sw: Stopwatch) -> None:
        for _, req, _ in items:
            if req.reset:
                self.cache.reset(req.session_id)
        per_sample: List[List[Any]] = []
        encoded: List[int] = []
        exact: List[bool] = []
        with sw("encode"):
            if self.cache_mode == "features":
                todo = [
                    (k, req, frame)
                    for k, (_, req, frame) in enumerate(items)
                    if self.cache.get(req.session_id, req.step, req.instruction) is None
                ]
                feats = self.vla.encode([f for _, _, f in todo], [r.instruction for _, r, _ in todo])
                fresh = {k: f for (k, _, _), f in zip(todo, feats)}
                for k, (_, req, _) in enumerate(items):
                    cur = fresh.get(k)
                    if cur is None:
                        cur = self.cache.get(req.session_id, req.step, req.instruction)
                    self.cache.put(req.session_id, req.step, req.instruction, cur)
                    values, slots = self.cache.context(req.session_id, req.step, req.instruction, cur)
                    per_sample.append(values)
                    encoded.append(1 if k in fresh else 0)
                    exact.append(all(s.exact for s in slots))
            else:  # frames: the baseline that re-encodes every frame of the context
                contexts = []
                for _, req, frame in items:
                    self.cache.put(req.session_id, req.step, req.instruction, frame)
                    values, slots = self.cache.context(req.session_id, req.step, req.instruction, frame)
                    contexts.append(values)
                    exact.append(all(s.exact for s in slots))
                per_sample = self.vla.encode_samples(contexts, [req.instruction for _, req, _ in items])
                encoded = [len(vs) for vs in contexts]
        with sw("expert"):
            reqs = [req for _, req, _ in items]
            state = None
            if self.cfg.state_dim:
                state = upload(
                    torch.stack(
                        [
                            torch.tensor(np.array(r.state))
                            if r.state is not None
                            else torch.zeros(self.cfg.state_dim)
                            for r in reqs
                        ]
                    ),
                    self.vla.device,
                )
            noise = self.vla.noise([r.noise_seed for r in reqs])
            guidance = self._guidance(reqs)
            if self.graphs is not None and guidance is None:
                chunks = self.graphs(*pack_frames(per_sample, self.vla.device), noise, state)
            else:
                with torch.no_grad():
                    ctx = self.vla.context(per_sample, state)
                chunks = self.vla.sample(ctx, noise, guidance)
            chunks = chunks.float().cpu().numpy()
        for k, (i, _, _) in enumerate(items):
            results[i] = ActionChunkResult(
                chunk=np.ascontiguousarray(chunks[k], dtype=np.float32),
                cache_hit=exact[k],
                frames_encoded=encoded[k],
            )

    def _guidance(self, reqs: Sequence[ActionChunkRequest]) -> Optional[Guidance]:
        if all(r.prev_chunk is None for r in reqs):
            return None
        H, A = self.cfg.chunk_size, self.cfg.action_dim
        prev = torch.zeros(len(reqs), H, A)
        weights = torch.zeros(len(reqs), H)
        delays = []
        for b, r in enumerate(reqs):
            if r.prev_chunk is None:
                delays.append(0)
                continue
            rows = min(len(r.prev_chunk), H)
            prev[b, :rows] = torch.tensor(np.array(r.prev_chunk[:rows]))
            weights[b] = guidance_weights(H, rows, r.inference_delay, r.execution_horizon)
            delays.append(min(r.inference_delay, rows))
        dev = self.vla.device
        return Guidance(prev.to(dev), weights.to(dev), delays, self.cfg.rtc_max_guidance)

    def close(self) -> None:
        self.cache = FeatureCache(self.cfg.num_frames, self.cfg.frame_skip)


def _rounds(indices: Sequence[int], requests: Sequence[ActionChunkRequest]) -> List[List[int]]:
    """Split a batch so each session appears at most once per round, in step order."""
    by_session: Dict[str, List[int]] = defaultdict(list)
    for i in indices:
        by_session[requests[i].session_id].append(i)
    rounds: List[List[int]] = []
    for idx in by_session.values():
        idx.sort(key=lambda i: requests[i].step)
        for n, i in enumerate(idx):
            if n == len(rounds):
                rounds.append([])
            rounds[n].append(i)
    return rounds


def vla_folder(settings) -> Optional[str]:
    return settings.option_group(VLAOptions).vla


def build_action_chunk_handler(settings, vlm: Any = None) -> ActionChunkHandler:
    """The action_chunk handler of a worker: `vla` option (or VLMQ_VLA) names the folder.
    `vlm`: the LoadedVLM the worker already holds for the chat kinds; it is shared when it
    is the folder the VLA was trained on, otherwise the VLA loads its own."""
    opts = settings.option_group(VLAOptions)
    folder = opts.vla
    if not folder:
        raise ValueError("serving action_chunk needs a VLA folder: --option vla=DIR (or VLMQ_VLA)")
    own = VLAConfig.load(folder).resolve_vlm_path(folder)
    if vlm is not None and os.path.realpath(getattr(vlm, "path", "") or "") != os.path.realpath(own):
        log.warning("the worker's model %s is not the VLA's VLM %s: loading the VLA's own", vlm.path, own)
        vlm = None
    vla = QwenVLA.load(
        folder, device=settings.device, dtype=settings.dtype, quantize=settings.quantize, vlm=vlm
    )
    if opts.vla_steps:
        vla.config = replace(vla.config, num_steps=opts.vla_steps)
    return ActionChunkHandler(
        vla,
        cache_mode=opts.vla_cache,
        max_sessions=opts.vla_sessions,
        ttl_s=opts.vla_ttl_s,
        limits=settings.limits,
        cuda_graphs=opts.vla_cuda_graphs,
    )
