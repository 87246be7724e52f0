"""QwenVLA on tiny random-weight Qwen-VL checkpoints (the real architectures, tiny shapes):
shapes, the frozen VLM, overfitting one batch, save/load, real-time chunking, training."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from inference_worker.vla.config import TINY, VLAConfig
from inference_worker.vla.model import QwenVLA
from inference_worker.vla.rtc import Guidance, guidance_weights
from schemas.actions import ACTION_DIM


def read_json(path):
    with open(path) as f:
        return json.load(f)


def frames(n: int, seed: int = 0, size: int = 112):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def vla(tiny_vla) -> QwenVLA:
    return QwenVLA.load(tiny_vla)


def test_shapes_and_parameter_counts(vla):
    cfg = vla.config
    assert (cfg.chunk_size, cfg.action_dim, cfg.num_frames, cfg.frame_skip) == (50, ACTION_DIM, 3, 2)
    assert cfg.vlm_layer == 1 and cfg.vlm_hidden == 64  # the tiny VLM has 2 decoder layers
    feats = vla.encode(frames(2), ["go to the red box", "go"])
    assert [f.shape[1] for f in feats] == [64, 64] and feats[0].shape[0] > feats[1].shape[0]
    ctx = vla.context([[feats[0]] * 3, [feats[1]] * 3])
    assert ctx.key_bias.shape == (2, 1, 1, 3 * feats[0].shape[0])
    v = vla.expert(torch.randn(2, 50, ACTION_DIM), torch.rand(2), ctx)
    assert v.shape == (2, 50, ACTION_DIM)
    chunks = vla.predict([frames(3, 1), frames(3, 2)], ["go", "go"], seeds=[1, 2])
    assert chunks.shape == (2, 50, ACTION_DIM) and torch.isfinite(chunks).all()
    counts = vla.parameter_counts()
    assert counts["frozen"] > 0 and counts["trainable"] == sum(p.numel() for p in vla.expert.parameters())
    assert "trainable" in vla.describe() and "frozen" in vla.describe()


def plain_velocity(expert, x, t, feats, ids, mask):
    """The expert as plain pre-norm blocks, a boolean key mask and t's own time embedding:
    the reference for its fused loop (adds fused with norms, additive mask, shared time
    embeddings)."""
    import torch.nn.functional as F

    from inference_worker.vla.expert import time_embedding

    ctx = expert.features(feats, ids)
    keep = mask[:, None, None, :]

    def attend(att, q_in, kv_in, causal=False, m=None):
        q = att._split(att.q(q_in))
        k, v = (att._split(z) for z in att.kv(kv_in).chunk(2, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)
        return att.out(y.transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], -1))

    H = x.shape[1]
    a = expert.action_in(x.to(expert.action_in.weight.dtype))
    te = time_embedding(t, a.shape[-1]).to(a.dtype)[:, None, :].expand(-1, H, -1)
    h = expert.action_time(torch.cat([a, te], dim=-1)) + expert.pos[:H]
    for blk in expert.blocks:
        h = h + attend(blk.cross, blk.norm_cross(h), ctx, m=keep)
        n = blk.norm_self(h)
        h = h + attend(blk.self_attn, n, n, causal=True)
        h = h + blk.mlp(blk.norm_mlp(h))
    return expert.action_out(expert.norm_out(h))


def test_sampling_equals_plain_blocks_bit_for_bit():
    """Euler sampling with the expert's fused loop (on a CPU: the torch add and norm) gives
    the Euler steps of plain_velocity exactly, padding keys masked."""
    from inference_worker.vla.expert import FlowMatchingExpert
    from inference_worker.vla.flow import euler_sample

    torch.manual_seed(0)
    cfg = VLAConfig(**TINY, vlm_hidden=48)
    expert = FlowMatchingExpert(cfg).eval()
    feats, ids = torch.randn(3, 20, 48), torch.randint(0, 3, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 12:] = False
    noise = torch.randn(3, cfg.chunk_size, cfg.action_dim)
    with torch.no_grad():
        got = euler_sample(expert, expert.prepare(feats, ids, mask), noise, cfg.num_steps)
        want, dt = noise, 1.0 / cfg.num_steps
        for k in range(cfg.num_steps):
            t = torch.full((3,), 1.0 - k * dt)
            want = want - dt * plain_velocity(expert, want, t, feats, ids, mask)
    assert torch.equal(got, want)


def test_the_served_expert_samples_what_the_trained_one_does():
    """serve() freezes the expert and fuses self-attention's q and k/v projections: the
    chunks match the unfused expert's (to float rounding), and the saved weights are the
    trained ones (the fused copies are not saved)."""
    import copy

    from inference_worker.vla.expert import FlowMatchingExpert
    from inference_worker.vla.flow import euler_sample

    torch.manual_seed(1)
    cfg = VLAConfig(**TINY, vlm_hidden=48)
    trained = FlowMatchingExpert(cfg).eval()
    served = copy.deepcopy(trained).serve()
    assert not any(p.requires_grad for p in served.parameters())
    assert served.state_dict().keys() == trained.state_dict().keys()
    feats, ids = torch.randn(2, 20, 48), torch.randint(0, 3, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.bool)
    noise = torch.randn(2, cfg.chunk_size, cfg.action_dim)
    with torch.no_grad():
        a = euler_sample(trained, trained.prepare(feats, ids, mask), noise, cfg.num_steps)
        b = euler_sample(served, served.prepare(feats, ids, mask), noise, cfg.num_steps)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_no_gradient_reaches_the_vlm(tiny_qwen2_vl):
    model = QwenVLA.build(VLAConfig(vlm_path=tiny_qwen2_vl, **TINY), seed=1)
    loss = model.forward_loss([frames(3, 3), frames(3, 4)], ["go", "go"], torch.randn(2, 50, ACTION_DIM))
    loss.backward()
    vlm_params = list(model.extractor.vlm.model.parameters())
    assert vlm_params and all(not p.requires_grad and p.grad is None for p in vlm_params)
    grads = [p.grad for p in model.expert.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_one_batch_overfits(vla, tiny_qwen2_vl):
    """The expert can fit a fixed batch (fixed frames, actions, noise and flow times): the
    loss falls at least 10x, so gradients reach every part that matters."""
    torch.manual_seed(0)
    model = QwenVLA.build(VLAConfig(vlm_path=tiny_qwen2_vl, **TINY), vlm=vla.extractor.vlm, seed=2)
    feats = model.encode(frames(6, 5), ["go"] * 6)
    with torch.no_grad():
        ctx0 = [feats[0:3], feats[3:6]]
    actions = torch.sign(torch.randn(2, 50, ACTION_DIM))
    noise, t = torch.randn(2, 50, ACTION_DIM), torch.tensor([0.3, 0.8])
    opt = torch.optim.AdamW(model.expert.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = model.loss(model.context(ctx0), actions, noise=noise, t=t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_save_load_round_trip_and_seeded_noise(vla, tmp_path):
    x = [frames(3, 7)]
    a = vla.predict(x, ["go"], seeds=[42])
    assert torch.equal(a, vla.predict(x, ["go"], seeds=[42]))
    assert not torch.equal(a, vla.predict(x, ["go"], seeds=[43]))
    vla.save(str(tmp_path / "copy"))
    assert sorted(os.listdir(tmp_path / "copy")) == ["config.json", "expert.safetensors"]
    assert read_json(tmp_path / "copy" / "config.json")["vlm_path"] == vla.config.vlm_path
    again = QwenVLA.load(str(tmp_path / "copy"), vlm=vla.extractor.vlm)
    assert torch.allclose(a, again.predict(x, ["go"], seeds=[42]), atol=1e-5)


def test_features_of_the_engine_pass_equal_transformers_truncated_forward(vla):
    """The extractor runs the vision tower with precomputed plans and the first k decoder
    layers through the engine's text stack; transformers' forward of the cut model
    (features.truncated_base) gives the same hidden states."""
    ex = vla.extractor
    assert ex.stack is not None and ex.vision.sync_free
    imgs = frames(3, 5)
    texts = ["go to the red box", "go", "turn left then go to the box"]
    from inference_worker.vla.features import VISION_END, VISION_START

    prompts = [ex._prompt(f, t) for f, t in zip(imgs, texts)]
    for p, t in zip(prompts, texts):  # the cached ids are the tokens of the whole prompt string
        assert p.short_ids == ex.vlm.tokenizer(f"{VISION_START}{ex.image_token}{VISION_END}{t}")["input_ids"]
    batch = ex.inputs.build(prompts, ex._pixels(imgs))
    with torch.no_grad():
        ours = ex.hidden_states(batch)
        ref = ex.view(**batch.model_kwargs(), use_cache=False).last_hidden_state
    keep = batch.attention_mask.bool()
    assert torch.allclose(ours[keep], ref[keep], atol=1e-4, rtol=1e-4)
    per_frame = ex.encode(imgs, texts)  # each frame's rows, cut from the padded batch
    assert [f.shape[0] for f in per_frame] == keep.sum(1).tolist()
    for i, f in enumerate(per_frame):
        assert torch.allclose(f, ours[i][keep[i]], atol=1e-4, rtol=1e-4)


def test_qwen3_vl_features(tiny_qwen3_vl):
    model = QwenVLA.build(VLAConfig(vlm_path=tiny_qwen3_vl, **TINY), seed=0)
    chunks = model.predict([frames(3, 8)], ["go"], seeds=[0])
    assert chunks.shape == (1, 50, ACTION_DIM) and torch.isfinite(chunks).all()


def test_rtc_freezes_the_delay_and_pulls_the_horizon_toward_the_previous_chunk(vla):
    w = guidance_weights(50, overlap=30, delay=4, horizon=10)
    assert w[:4].tolist() == [1.0] * 4 and (w[14:] == 0).all()
    assert all(w[i] > w[i + 1] for i in range(4, 13)) and 0 < w[13] < 1
    feats = vla.encode(frames(3, 9), ["go"] * 3)
    with torch.no_grad():
        ctx = vla.context([feats, feats])
    prev = torch.zeros(2, 50, ACTION_DIM)
    prev[0, :30] = torch.sign(torch.randn(30, ACTION_DIM))
    weights = torch.stack([guidance_weights(50, 30, 4, 20), torch.zeros(50)])
    noise = vla.noise([5, 5])
    free = vla.sample(ctx, noise)
    guided = vla.sample(ctx, noise, Guidance(prev, weights, [4, 0], vla.config.rtc_max_guidance))
    assert torch.equal(guided[0, :4], prev[0, :4])
    err = lambda c: float((c[4:24] - prev[0, 4:24]).abs().mean())  # noqa: E731
    assert err(guided[0]) < err(free[0])
    # A row without a previous chunk in the same batch is sampled as if unguided.
    assert torch.allclose(guided[1], free[1], atol=1e-5)


def test_training_loop_checkpoints_and_resumes(vla, tiny_qwen2_vl, tmp_path):
    # Two small episodes written straight as shards.
    from env_agents.recording import actions as A
    from ops.vla.convert import AlignedEpisode, save_episode
    from ops.vla.train import TrainConfig, train

    os.makedirs(tmp_path / "data" / "train")
    os.makedirs(tmp_path / "data" / "val")
    rels = {"train": [], "val": []}
    for n, split in enumerate(["train", "val"]):
        acts = np.stack([A.action_to_vector(i % 3) for i in range(12)])
        ep = AlignedEpisode(
            f"e{n}",
            np.stack(frames(12, 10 + n, 32)),
            acts,
            np.arange(12),
            np.arange(12) * 100.0,
            [[] for _ in range(12)],
            "go",
            {},
        )
        save_episode(ep, str(tmp_path / "data" / split / f"e{n}.npz"))
        rels[split].append(f"{split}/e{n}.npz")
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"splits": {**rels, "test": []}}))
    model = QwenVLA.build(VLAConfig(vlm_path=tiny_qwen2_vl, **TINY), vlm=vla.extractor.vlm, seed=3)
    out = str(tmp_path / "run")
    tc = TrainConfig(
        data=str(tmp_path / "data"),
        out=out,
        steps=6,
        batch_size=4,
        eval_every=3,
        save_every=3,
        warmup=2,
        val_samples=8,
    )
    res = train(model, tc, progress=False, log=lambda *_: None)
    assert res["steps"] == 6 and np.isfinite(res["val_loss"]) and 0 <= res["val_key_acc"] <= 1
    for f in ["config.json", "expert.safetensors", "train_state.pt", "history.json", "loss.png", "best"]:
        assert os.path.exists(os.path.join(out, f)), f
    tc.steps, tc.resume = 9, True
    again = QwenVLA.load(out, vlm=vla.extractor.vlm)
    res2 = train(again, tc, progress=False, log=lambda *_: None)
    history = read_json(os.path.join(out, "history.json"))
    assert res2["steps"] == 9 and [h["step"] for h in history] == list(range(1, 10))


def test_cli_record_convert_train_eval(tiny_qwen2_vl, tmp_path, capsys):
    """The whole `vlmq vla` pipeline on real files, tiny sizes."""
    import importlib.util

    if importlib.util.find_spec("miniworld") is None:
        pytest.skip("MiniWorld is not installed (the envs extra)")
    from ops.cli import main

    rec, shards, out = str(tmp_path / "rec"), str(tmp_path / "shards"), str(tmp_path / "vla")
    assert main(["vla", "record", "--out", rec, "--episodes", "3", "--size", "64", "--max-steps", "12"]) == 0
    assert main(["vla", "convert", rec, shards, "--image-size", "56"]) == 0
    args = ["vla", "train", "--vlm", tiny_qwen2_vl, "--data", shards, "--out", out, "--image-size", "56"]
    args += ["--expert-layers", "1", "--expert-dim", "32", "--expert-heads", "2", "--chunk-size", "8"]
    assert main([*args, "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--warmup", "1"]) == 0
    with pytest.raises(SystemExit):  # an existing VLA is never overwritten silently
        main([*args, "--steps", "4"])
    assert QwenVLA.load(out).config.chunk_size == 8
    capsys.readouterr()
    assert main(["vla", "eval", "--vla", out, "--episodes", "1", "--size", "64", "--max-steps", "10"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["vla"]["success_rate"] <= 1.0 and report["vla"]["chunks"] > 0
    assert 0.0 <= report["random"]["success_rate"] <= 1.0


def test_batches_padded_to_a_graph_bucket_give_each_frame_its_own_features(vla):
    """With CUDA graphs a batch of 3 runs as the bucket of 4 (the last frame repeated); each
    real frame's features are what the unpadded batch gives it."""

    class Buckets:  # graphs that never replay: the eager pass of the padded batch runs
        max_batch = 64
        captured = 0

        def image_features(self, frames):
            return None

        def __call__(self, batch, feats):
            self.seen = batch.batch
            return None

    ex = vla.extractor
    imgs, texts = frames(3, 11), ["go", "go to the red box please", "turn"]
    plain = ex.encode(imgs, texts)
    ex.graphs = Buckets()
    try:
        padded = ex.encode(imgs, texts)
        assert ex.graphs.seen == 4
    finally:
        ex.graphs = None
    assert len(padded) == 3
    for a, b in zip(plain, padded):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)
