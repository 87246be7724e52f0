"""Training the action expert on converted shards (the VLM stays frozen and is run once
per frame, see bank.py).

AdamW (no weight decay on biases and norms), linear warm-up then cosine decay, gradient
clipping, gradient accumulation, bf16 autocast on CUDA. Every `eval_every` steps:
validation flow loss, and chunks sampled with the Euler sampler compared with the
recorded ones (MSE, key/button accuracy, smoothness). The output folder is a VLA folder
(config.json + expert.safetensors, the latest weights), with best/ (lowest validation
loss), train_state.pt (optimizer, scheduler, step: resume with resume=True),
history.json and loss.png.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List

import torch

from inference_worker.vla.flow import flow_matching_loss
from inference_worker.vla.model import QwenVLA
from ops.vla.bank import FeatureBank
from ops.vla.dataset import load_split
from schemas.actions import BUTTON_SLICE, KEY_SLICE

STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    data: str
    out: str
    steps: int = 2000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    eval_every: int = 200
    save_every: int = 500
    val_samples: int = 256
    encode_batch: int = 32
    precision: str = "auto"  # auto (bf16 on CUDA) | bf16 | fp32
    seed: int = 0
    resume: bool = False


def param_groups(module: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _autocast(device: torch.device, precision: str):
    use = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


@torch.no_grad()
def evaluate(vla: QwenVLA, bank: FeatureBank, samples: int, seed: int, precision: str) -> Dict[str, float]:
    """Validation loss and sampled-chunk metrics on a fixed subset of a bank."""
    cfg = vla.config
    g = torch.Generator().manual_seed(seed)
    n = min(samples, len(bank))
    idx = torch.randperm(len(bank), generator=g)[:n]
    vla.expert.eval()
    totals = {"val_loss": 0.0, "val_mse": 0.0, "val_key_acc": 0.0, "val_smooth": 0.0, "data_smooth": 0.0}
    batches = 0
    for chunk in idx.split(64):
        feats, ids, mask, actions, amask = bank.batch(chunk, cfg.num_frames, cfg.frame_skip, cfg.chunk_size)
        with _autocast(vla.device, precision):
            ctx = vla.expert.prepare(feats, ids, mask)
            loss = flow_matching_loss(vla.expert, ctx, actions, amask, generator=g)
            pred = vla.sample(ctx, torch.randn(actions.shape, generator=g).to(actions.device)).float()
        m = amask[:, :, None].float()
        totals["val_loss"] += float(loss)
        totals["val_mse"] += float(((pred - actions) ** 2 * m).sum() / (m.sum() * actions.shape[-1]))
        binary = slice(BUTTON_SLICE.start, KEY_SLICE.stop)
        agree = ((pred[..., binary] > 0) == (actions[..., binary] > 0)).float()
        totals["val_key_acc"] += float((agree * m).sum() / (m.sum() * agree.shape[-1]))
        totals["val_smooth"] += float(_roughness(pred, amask))
        totals["data_smooth"] += float(_roughness(actions, amask))
        batches += 1
    vla.expert.train()
    return {k: v / max(batches, 1) for k, v in totals.items()}


def _roughness(chunks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared second difference along the chunk (lower is smoother)."""
    d2 = chunks[:, 2:] - 2 * chunks[:, 1:-1] + chunks[:, :-2]
    m = (mask[:, 2:] & mask[:, :-2]).float()[:, :, None]
    return (d2**2 * m).sum() / (m.sum() * chunks.shape[-1]).clamp(min=1.0)


def plot_history(history: List[Dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(vla: QwenVLA, tc: TrainConfig, progress: bool = True, log=print) -> Dict[str, Any]:
    """Train vla.expert in place; returns the final metrics (and writes tc.out)."""
    cfg = vla.config
    device = vla.device
    os.makedirs(tc.out, exist_ok=True)
    log(vla.describe())
    t0 = time.time()
    train_eps, val_eps = load_split(tc.data, "train"), load_split(tc.data, "val")
    if not train_eps:
        raise ValueError(f"{tc.data}: the train split is empty")
    bank = FeatureBank.build(vla, train_eps, tc.encode_batch, progress=progress, desc="encoding train frames")
    val_bank = (
        FeatureBank.build(vla, val_eps, tc.encode_batch, progress=progress, desc="encoding val frames")
        if val_eps
        else None
    )
    encode_s = time.time() - t0
    log(
        f"encoded {bank.feats.shape[0]} train + {val_bank.feats.shape[0] if val_bank else 0} val frames in {encode_s:.1f}s"
    )

    expert = vla.expert
    expert.train()
    opt = torch.optim.AdamW(param_groups(expert, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(tc.warmup, tc.steps))
    history: List[Dict[str, float]] = []
    step, best = 0, math.inf
    state_path = os.path.join(tc.out, STATE_FILE)
    if tc.resume and os.path.isfile(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, best = int(state["step"]), float(state["best"])
        with open(os.path.join(tc.out, "history.json")) as f:
            history = json.load(f)
        log(f"resumed at step {step}")
    g = torch.Generator().manual_seed(tc.seed + step)

    def save(folder: str) -> None:
        vla.save(folder)

    def checkpoint() -> None:
        save(tc.out)
        torch.save(
            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "best": best},
            state_path,
        )
        with open(os.path.join(tc.out, "history.json"), "w") as f:
            json.dump(history, f)
        with open(os.path.join(tc.out, "train_config.json"), "w") as f:
            json.dump(asdict(tc), f, indent=1)
        plot_history(history, os.path.join(tc.out, "loss.png"))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc="training", unit="step")
    train_t = time.time()
    metrics: Dict[str, float] = {}
    while step < tc.steps:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(tc.grad_accum):
            idx = torch.randint(len(bank), (tc.batch_size,), generator=g)
            feats, ids, mask, actions, amask = bank.batch(idx, cfg.num_frames, cfg.frame_skip, cfg.chunk_size)
            with _autocast(device, tc.precision):
                ctx = expert.prepare(feats, ids, mask)
                loss = flow_matching_loss(expert, ctx, actions, amask, generator=g) / tc.grad_accum
            loss.backward()
            total += float(loss.detach())
        gnorm = float(torch.nn.utils.clip_grad_norm_(expert.parameters(), tc.grad_clip))
        opt.step()
        sched.step()
        step += 1
        row = {"step": step, "loss": total, "lr": sched.get_last_lr()[0], "grad_norm": gnorm}
        if val_bank is not None and (step % tc.eval_every == 0 or step == tc.steps):
            metrics = evaluate(vla, val_bank, tc.val_samples, tc.seed, tc.precision)
            row.update(metrics)
            if metrics["val_loss"] < best:
                best = metrics["val_loss"]
                save(os.path.join(tc.out, "best"))
        history.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", **({"val": f"{metrics['val_loss']:.4f}"} if metrics else {}))
        if step % tc.save_every == 0 or step == tc.steps:
            checkpoint()
    if bar is not None:
        bar.close()
    if not history or history[-1]["step"] != step:
        checkpoint()
    train_s = time.time() - train_t
    final = {"steps": step, "train_s": train_s, "encode_s": encode_s, "best_val_loss": best, **metrics}
    if history:
        final["first_loss"] = history[0]["loss"]
        final["last_loss"] = history[-1]["loss"]
    log(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in final.items()}))
    return final
