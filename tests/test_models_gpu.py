"""CUDA-only checks of the chat engine (run on a GPU machine: `pytest -m gpu`; skipped elsewhere).

Tiny random-weight checkpoints in fp32: decoding by CUDA-graph replay must give the
tokens eager decoding gives, batched or not, and the tokens of transformers' generate.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _prompts():
    from inference_worker.engines.prompt import user_prompt

    rs = np.random.RandomState(3)
    sizes = [224, 64, 100, 224, 300]
    out = [
        user_prompt(rs.randint(0, 256, (s, s, 3), dtype=np.uint8), "next action? " * (1 + i))
        for i, s in enumerate(sizes)
    ]
    out.append(user_prompt("text only"))
    return out


def _graphs_agree_with_eager(graphs, eager):
    """Decode _prompts() with both engines, batched and (graphs) one at a time: the tokens
    must agree and graphs must have been captured. Returns the prompts and the batched
    graph outputs for the caller's own reference."""
    from inference_worker.engines.sampling import Sampling

    prompts = _prompts()
    samp = [Sampling(max_tokens=10)] * len(prompts)
    g = graphs.generate(prompts, samp)
    e = eager.generate(prompts, samp)
    alone = [graphs.generate([p], [s])[0] for p, s in zip(prompts, samp)]
    assert [x.token_ids for x in g] == [x.token_ids for x in e] == [x.token_ids for x in alone]
    assert graphs.decoder.graphs.captured >= 2
    return prompts, g


@pytest.mark.parametrize("fixture", ["tiny_qwen2_vl", "tiny_qwen3_vl"])
def test_graph_decoding_equals_eager_and_generate(request, fixture):
    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.options import EngineOptions
    from inference_worker.models import load_vlm

    vlm = load_vlm(request.getfixturevalue(fixture), device="cuda", dtype="float32")
    graphs = ChatEngine(vlm, EngineOptions(decode="graphs", fuse="on"))
    eager = ChatEngine(vlm, EngineOptions(decode="eager", fuse="off"))
    assert graphs.decoder.graphs is not None and eager.decoder.graphs is None
    prompts, g = _graphs_agree_with_eager(graphs, eager)
    batch = graphs.inputs.build(prompts[:1])
    kw = batch.model_kwargs()
    kw.pop("position_ids")
    ref = vlm.model.generate(**kw, max_new_tokens=10, do_sample=False)[0, batch.length :].tolist()
    assert g[0].token_ids == ref[: len(g[0].token_ids)]


def test_graph_steps_equal_eager_steps_bit_for_bit_at_the_same_shapes(tiny_qwen2_vl):
    """bf16, where random weights leave near-ties everywhere: replaying the captured step
    and running the same step eagerly at the same (batch bucket, span) give identical
    tokens, joining mid-decode included."""
    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.options import EngineOptions
    from inference_worker.engines.sampling import Sampling
    from inference_worker.models import load_vlm

    vlm = load_vlm(tiny_qwen2_vl, device="cuda", dtype="bfloat16")
    prompts = _prompts()
    runs = []
    for decode in ("graphs", "eager-bucketed"):
        engine = ChatEngine(vlm, EngineOptions(decode=decode, fuse="on", kv_slots=8, ignore_eos=True))
        keys = [object() for _ in prompts]
        done = {}
        for p in prompts:
            engine.check(p)
        for key, c in engine.admit(keys[:3], prompts[:3], [Sampling(max_tokens=20)] * 3):
            done[id(key)] = c.token_ids
        for step in range(40):
            if step == 4:
                for key, c in engine.admit(keys[3:], prompts[3:], [Sampling(max_tokens=12)] * 3):
                    done[id(key)] = c.token_ids
            for key, c in engine.step():
                done[id(key)] = c.token_ids
        runs.append([done[id(k)] for k in keys])
    assert runs[0] == runs[1]


def test_decoding_ahead_on_cuda_equals_reading_every_step_first(tiny_qwen2_vl):
    """Graph steps launched before the previous step's tokens are read (the copies go
    through pinned memory and an event) give the tokens, reasons and logprobs of reading
    every step first, with rows joining mid-decode, sampled rows and logprobs."""
    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.options import EngineOptions
    from inference_worker.engines.sampling import Sampling
    from inference_worker.models import load_vlm

    vlm = load_vlm(tiny_qwen2_vl, device="cuda", dtype="float32")
    prompts = _prompts()
    rows = [
        Sampling(max_tokens=16),
        Sampling(max_tokens=9, temperature=0.8, seed=4, logprobs=True, top_logprobs=2),
        Sampling(max_tokens=12, n=2, temperature=1.0, seed=1),
        Sampling(max_tokens=1),
        Sampling(max_tokens=20, logprobs=True),
        Sampling(max_tokens=5),
    ]
    runs = []
    for ahead in (True, False):
        engine = ChatEngine(vlm, EngineOptions(decode="graphs", fuse="on", kv_slots=16, decode_ahead=ahead))
        assert engine.decoder.ahead is ahead
        out = []
        for c in engine.generate(prompts, rows):
            for a in c if isinstance(c, list) else [c]:
                lp = a.logprobs and [(t, round(v, 3)) for t, v, _ in a.logprobs]
                out.append((a.token_ids, a.finish_reason, lp))
        runs.append(out)
    assert runs[0] == runs[1]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_the_reference_ops(dtype):
    """QuickGELU, SiLU(gate)*up on the halves of one tensor, the vision rotary embedding on
    the strided q/k views of a qkv projection, the vision blocks' add + LayerNorm and the
    text rotary, at sizes that are and are not multiples of the block: as transformers' ops
    computed in float32 and rounded once."""
    from inference_worker.engines import triton_kernels as tk

    if not tk.available():
        pytest.skip("triton is not installed")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    g = torch.Generator(device="cuda").manual_seed(0)
    for rows in (1, 37, 2048):
        x = torch.randn(rows, 5120, device="cuda", generator=g).to(dtype)
        xf = x.float()
        assert torch.allclose(
            tk.quick_gelu(x).float(), (xf * torch.sigmoid(1.702 * xf)).to(dtype).float(), **tol
        )
        gu = torch.randn(rows, 3, 2 * 136, device="cuda", generator=g).to(dtype)
        gate, up = gu.chunk(2, dim=-1)
        want = (torch.nn.functional.silu(gate.float()) * up.float()).to(dtype)
        assert torch.allclose(tk.silu_mul(gate, up).float(), want.float(), **tol)
        heads, dim = 16, 80
        qkv = torch.randn(rows, 3, heads, dim, device="cuda", generator=g).to(dtype)
        q, k, _ = qkv.permute(1, 0, 2, 3).unbind(0)
        angles = torch.randn(rows, dim // 2, device="cuda", generator=g)
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        qo, ko = tk.rotary_vision(q, k, cos, sin)
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
        for got, x in ((qo, q), (ko, k)):
            want = (x.float() * c + _rotate_half(x.float()) * s).to(dtype)
            assert got.shape == x.shape and torch.allclose(got.float(), want.float(), **tol)
        # the vision blocks' residual add + LayerNorm: the sum as h + d, the norm as torch's
        h, d = (torch.randn(rows, 1280, device="cuda", generator=g).to(dtype) for _ in range(2))
        w, b = (torch.randn(1280, device="cuda", generator=g).to(dtype) for _ in range(2))
        got_s, got_y = tk.add_layer_norm(h, d, w, b, 1e-6)
        assert torch.equal(got_s, h + d)
        want = torch.nn.functional.layer_norm((h + d).float(), (1280,), w.float(), b.float(), 1e-6)
        assert torch.allclose(got_y.float(), want.to(dtype).float(), **tol)
        # the language model's rotary (rope=triton): GQA q/k views of one projection
        h, kv, d = 12, 2, 128
        proj = torch.randn(2, rows, (h + 2 * kv) * d, device="cuda", generator=g).to(dtype)
        tq = proj[..., : h * d].view(2, rows, h, d).transpose(1, 2)
        tk_ = proj[..., h * d : (h + kv) * d].view(2, rows, kv, d).transpose(1, 2)
        ang = torch.randn(2, rows, d // 2, device="cuda", generator=g)
        tcos, tsin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
        for got, x in zip(tk.rope(tq, tk_, tcos, tsin), (tq, tk_)):
            c2, s2 = tcos.float().unsqueeze(1), tsin.float().unsqueeze(1)
            want = (x.float() * c2 + _rotate_half(x.float()) * s2).to(dtype)
            assert got.shape == x.shape and torch.allclose(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_quick_gelu_matches_the_product_then_the_activation(dtype):
    """The vision MLP's fc1 with QuickGELU in its epilogue (half precision on Hopper: the
    persistent TMA kernel; float32: cuBLAS then the elementwise kernel) equals the product
    and the activation computed in float32 and rounded once, for row counts that are and
    are not multiples of the tile, 2-D and batched inputs."""
    from inference_worker.engines import triton_kernels as tk

    if not tk.available():
        pytest.skip("triton is not installed")
    g = torch.Generator(device="cuda").manual_seed(1)
    w = (torch.randn(5120, 1280, device="cuda", generator=g) * 0.03).to(dtype)
    b = (torch.randn(5120, device="cuda", generator=g) * 0.1).to(dtype)
    for shape in ((300, 1280), (6272, 1280), (2, 131, 1280)):
        x = torch.randn(*shape, device="cuda", generator=g).to(dtype)
        ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
        ref = (ref * torch.sigmoid(1.702 * ref)).to(dtype).float()
        got = tk.linear_quick_gelu(x, w, b)
        assert got.shape == (*shape[:-1], 5120) and got.dtype == dtype
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got.float(), ref, atol=tol, rtol=tol), (got.float() - ref).abs().max()


@pytest.mark.parametrize("rows", [300, 9984])
def test_linear_swiglu_matches_the_product_then_silu_mul(rows):
    """The text MLP's gate/up product with SwiGLU in its epilogue, at the 2B model's shapes
    (K 1536, F 8960) and bf16, equals the product and SwiGLU computed in float32 and
    rounded once, for row counts that are and are not multiples of the tile."""
    from inference_worker.engines import triton_kernels as tk

    if not tk.available():
        pytest.skip("triton is not installed")
    g = torch.Generator(device="cuda").manual_seed(2)
    w = (torch.randn(2 * 8960, 1536, device="cuda", generator=g) * 0.03).to(torch.bfloat16)
    x = torch.randn(rows, 1536, device="cuda", generator=g).to(torch.bfloat16)
    gate, up = torch.nn.functional.linear(x.float(), w.float()).chunk(2, dim=-1)
    ref = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16).float()
    got = tk.linear_swiglu(x, w)
    assert got.shape == (rows, 8960) and got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), ref, atol=2e-2, rtol=2e-2), (got.float() - ref).abs().max()


def test_prefill_swiglu_epilogue_gives_the_prompt_pass_of_the_kernel(tiny_qwen2_vl, monkeypatch):
    """prefill_swiglu=epilogue through the text stack's prompt pass (bf16, 4 x 64 rows): every
    layer's MLP runs the fused kernel, and the last tokens' logits are those of the product
    then the SwiGLU kernel, to bf16 rounding."""
    from inference_worker.engines import triton_kernels as tk
    from inference_worker.engines.text_stack import TextStack
    from inference_worker.models import load_vlm

    if not tk.available():
        pytest.skip("triton is not installed")
    vlm = load_vlm(tiny_qwen2_vl, device="cuda", dtype="bfloat16")
    launches = []
    kernel = tk._linear_swiglu

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tk, "_linear_swiglu", Counted())
    b, t = 4, 64
    g = torch.Generator(device="cuda").manual_seed(3)
    logits = []
    for swiglu in ("kernel", "epilogue"):
        stack = TextStack(vlm.model, compile=True, swiglu=swiglu)
        embeds = torch.randn(b, t, stack.embed.weight.shape[1], device="cuda", generator=g).to(torch.bfloat16)
        g.manual_seed(3)
        positions = torch.arange(t, device="cuda").expand(3, b, t)
        with torch.inference_mode():
            logits.append(
                stack.prefill(stack.new_cache(b, t), embeds, positions, torch.ones(b, t, device="cuda"))
            )
    assert len(launches) == len(vlm.model.model.language_model.layers)
    err = (logits[1] - logits[0]).abs().max()
    assert err <= 0.03 * logits[0].abs().max(), (err, logits[0].abs().max())


def test_fused_vision_tower_equals_the_plain_one(tiny_qwen2_vl):
    """The tower with the Triton rotary, QuickGELU and add + LayerNorm gives the plain
    tower's features."""
    import transformers.models.qwen2_vl.modeling_qwen2_vl as modeling

    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.options import EngineOptions
    from inference_worker.models import load_vlm

    prompts = _prompts()[:4]

    def features(fuse: str):
        engine = ChatEngine(load_vlm(tiny_qwen2_vl, device="cuda", dtype="float32"), EngineOptions(fuse=fuse))
        blocks = engine.model.model.visual.blocks
        assert all("forward" in vars(b) for b in blocks) == (fuse == "on")  # fuse_block_norms
        batch = engine.inputs.build(prompts)
        with torch.inference_mode():
            return engine.vision(batch.pixel_values, batch.grids, batch.image_grid_thw)

    swapped = modeling.apply_rotary_pos_emb_vision  # module-wide once any engine fused it
    modeling.apply_rotary_pos_emb_vision = getattr(swapped, "original", swapped)
    try:
        plain = features("off")
    finally:
        modeling.apply_rotary_pos_emb_vision = swapped
    fused = features("on")
    assert getattr(modeling.apply_rotary_pos_emb_vision, "vlmq_fused", False)
    assert torch.allclose(plain, fused, atol=1e-4, rtol=1e-4)


def test_nf4_through_the_engine(tiny_qwen2_vl):
    """`quantize=nf4` on the engine's path: the text stack over bitsandbytes' Linear4bit (the
    fused q/k/v and gate/up GEMMs skip quantized layers), CUDA-graph decode == eager decode
    == batch-1, and the stock forward of a separately loaded nf4 copy (fp32 compute: same
    greedy tokens, teacher-forced top-5 log-probs within 1e-3)."""
    bnb = pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes (prepare.sh --nf4 carries it)")
    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.options import EngineOptions
    from inference_worker.engines.parity import compare_topk, engine_trace, reference_trace
    from inference_worker.models import load_vlm

    vlm = load_vlm(tiny_qwen2_vl, device="cuda", dtype="float32", quantize="nf4")
    pristine = load_vlm(tiny_qwen2_vl, device="cuda", dtype="float32", quantize="nf4")
    layer = vlm.model.model.language_model.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit) and isinstance(
        layer.mlp.up_proj, bnb.nn.Linear4bit
    )
    graphs = ChatEngine(vlm, EngineOptions(decode="graphs", fuse="on"))
    eager = ChatEngine(vlm, EngineOptions(decode="eager", fuse="off"))
    assert graphs.decoder.graphs is not None and all(f is None for f in graphs.stack.fused)
    prompts, g = _graphs_agree_with_eager(graphs, eager)
    for prompt, ours in zip(prompts[:2], g):
        ref = reference_trace(pristine, prompt, max_tokens=10)
        assert ours.token_ids == ref.tokens[: len(ours.token_ids)]
        report = compare_topk(ref, engine_trace(graphs, prompt, ref.tokens))
        assert report.argmax_agreement == 1.0 and report.max_abs_diff < 1e-3, report
    scored = graphs.score(prompts[:2], [["0", "1", "-1"]] * 2)
    assert all(len(s.scores) == 3 and all(x < 0 for x in s.scores) for s in scored)


def test_nf4_self_check_passes_in_bf16(tiny_qwen2_vl):
    """The worker's start-up check on the nf4 engine in bf16 compute (the serving dtype)."""
    pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes (prepare.sh --nf4 carries it)")
    from inference_worker.engines.options import EngineOptions
    from inference_worker.engines.self_check import checked_engine
    from inference_worker.models import load_vlm

    vlm = load_vlm(tiny_qwen2_vl, device="cuda", quantize="nf4")
    engine, served = checked_engine(
        vlm, EngineOptions(), reload=lambda: pytest.fail("fell back"), strict=True
    )
    assert served is vlm and engine.options.vision == "fast"


@pytest.mark.parametrize("served", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vla_expert_graph_and_triton_norms_equal_the_plain_blocks(dtype, served):
    """The expert's Euler steps replayed as a CUDA graph (bucketed batch and key length, the
    Triton add + norm, the GELU in the up projection's epilogue; served: q/k/v fused) give
    the eager steps and the plain pre-norm blocks' (test_vla_model)."""
    from inference_worker.vla.config import TINY, VLAConfig
    from inference_worker.vla.expert import FlowMatchingExpert
    from inference_worker.vla.flow import euler_sample
    from inference_worker.vla.graphs import GraphedSampler
    from tests.test_vla_model import plain_velocity

    torch.manual_seed(0)
    cfg = VLAConfig(**TINY, vlm_hidden=48)
    expert = FlowMatchingExpert(cfg).to("cuda", dtype).eval()
    if served:
        expert.serve()
    feats = torch.randn(3, 20, 48, device="cuda", dtype=dtype)
    ids = torch.randint(0, 3, (3, 20), device="cuda")
    mask = torch.ones(3, 20, dtype=torch.bool, device="cuda")
    mask[1, 12:] = False
    noise = torch.randn(3, cfg.chunk_size, cfg.action_dim, device="cuda")
    with torch.no_grad():
        eager = euler_sample(expert, expert.prepare(feats, ids, mask), noise, cfg.num_steps)
        graphed = GraphedSampler(expert, cfg.num_steps)(feats, ids, mask, noise)
        want, dt = noise, 1.0 / cfg.num_steps
        for k in range(cfg.num_steps):
            t = torch.full((3,), 1.0 - k * dt, device="cuda")
            want = want - dt * plain_velocity(expert, want, t, feats, ids, mask).float()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    assert torch.allclose(graphed, eager, **tol)
    assert torch.allclose(eager, want, **tol), (eager - want).abs().max()


def test_vla_feature_graphs_equal_the_eager_pass(tiny_vla):
    """The VLM feature pass replayed as CUDA graphs (padded to a length bucket) gives the
    eager pass's features: at batch 1 and 2 (one frame size: pixels and tower replay as one
    graph) and at a batch of mixed instruction lengths and frame sizes (eager tower, text
    graph)."""
    from inference_worker.vla.model import QwenVLA

    vla = QwenVLA.load(tiny_vla, device="cuda", dtype="float32")
    ex = vla.extractor
    rs = np.random.RandomState(5)
    frames = [rs.randint(0, 256, (s, s, 3), dtype=np.uint8) for s in (112, 112, 96)]
    texts = ["go", "go to the red box please", "turn"]
    for n in (1, 2, 3):
        eager = ex.encode(frames[:n], texts[:n])
        assert ex.use_cuda_graphs()
        graphed = ex.encode(frames[:n], texts[:n])
        again = ex.encode(frames[:n][::-1], texts[:n][::-1])[::-1]  # replay with other inputs
        ex.graphs = None  # eager again for the next n
        for a, b, c in zip(eager, graphed, again):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
            assert torch.allclose(a, c, atol=1e-4, rtol=1e-4)


def test_vision_graphs_replay_the_padded_pass(tiny_qwen2_vl):
    """vision_graphs=on: groups of one frame size replay their bucket's graph (3 and 4 frames
    share one), and give the features and greedy tokens of the eager tower; a group of mixed
    sizes runs eagerly."""
    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.options import EngineOptions
    from inference_worker.engines.prompt import user_prompt
    from inference_worker.engines.sampling import Sampling
    from inference_worker.models import load_vlm

    vlm = load_vlm(tiny_qwen2_vl, device="cuda", dtype="float32")
    graphs = ChatEngine(vlm, EngineOptions(vision_graphs="on"))
    eager = ChatEngine(vlm, EngineOptions(vision_graphs="off"))
    rs = np.random.RandomState(4)
    frames = [rs.randint(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(4)]
    for group in (frames[:3], frames, frames[1:]):
        batch = graphs.inputs.build([user_prompt(f, "x") for f in group])
        with torch.inference_mode():
            ours = graphs.vision_pass(batch.pixel_values, batch.grids, batch.image_grid_thw)
            ref = eager.vision_pass(batch.pixel_values, batch.grids, batch.image_grid_thw)
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
    assert graphs.vision_pass.captured == 1
    # four prompts are one prefill piece (PrefillGraphs.pieces; three would run as 2 + 1)
    prompts = [user_prompt(f, "next action?") for f in frames] + _prompts()
    samp = [Sampling(max_tokens=8)] * len(prompts)
    got = [c.token_ids for c in graphs.generate(prompts[:4], samp[:4])]
    assert got == [c.token_ids for c in eager.generate(prompts[:4], samp[:4])]
    assert graphs.vision_pass.captured == 1
    mixed = graphs.generate(prompts[4:], samp[4:])
    assert [c.token_ids for c in mixed] == [c.token_ids for c in eager.generate(prompts[4:], samp[4:])]
    batch = graphs.inputs.build(_prompts()[:3])  # several sizes: the eager tower
    captured = graphs.vision_pass.captured
    with torch.inference_mode():
        ours = graphs.vision_pass(batch.pixel_values, batch.grids, batch.image_grid_thw)
        ref = eager.vision_pass(batch.pixel_values, batch.grids, batch.image_grid_thw)
    assert torch.equal(ours, ref)
    assert graphs.vision_pass.captured == captured


def test_prefill_graphs_replay_the_padded_pass(tiny_qwen2_vl):
    """prefill_graphs=on: a group's text layers replay the graph of its (rows, width) bucket
    and give the greedy tokens of the eager unpadded pass, pieces of one shape sharing a
    graph; decoding continues from the bucket's width."""
    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.options import EngineOptions
    from inference_worker.engines.sampling import Sampling
    from inference_worker.models import load_vlm

    vlm = load_vlm(tiny_qwen2_vl, device="cuda", dtype="float32")
    graphs = ChatEngine(vlm, EngineOptions(prefill_graphs="on", vision_graphs="on"))
    eager = ChatEngine(vlm, EngineOptions())
    prompts = _prompts()
    same = [prompts[0]] * 4
    samp = [Sampling(max_tokens=8)] * 6
    assert graphs.prefill_pass.pieces(3, 1) == [2, 1]
    for group in (same[:2], same, same[:3]):
        want = [c.token_ids for c in eager.generate(group, samp[: len(group)])]
        assert [c.token_ids for c in graphs.generate(group, samp[: len(group)])] == want
    # (2, w) and (4, w); three prompts run as 2 + 1, the 2 replaying the first graph
    assert graphs.prefill_pass.captured == 3
    want = [c.token_ids for c in eager.generate(prompts, samp)]
    assert [c.token_ids for c in graphs.generate(prompts, samp)] == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernels_match_the_reference_ops(dtype):
    """A decode step's rope + cache write and its attention (decode_attention=triton) at the
    2B model's head layout (12 query heads on 2 KV heads of 128), rows with masked columns
    and spans that are not a multiple of the kernel's block, the attention whole or split into
    64- or 128-column pieces: fused.rope, the indexed cache writes and grouped_attention under
    attention_bias."""
    from inference_worker.engines import triton_kernels as tk
    from inference_worker.engines.fused import rope
    from inference_worker.engines.text_stack import attention_bias, grouped_attention

    if not tk.available():
        pytest.skip("triton is not installed")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    g = torch.Generator(device="cuda").manual_seed(0)
    heads, kv, d, cap = 12, 2, 128, 512
    for b, span in ((1, 64), (37, 300), (128, 256)):
        qkv = torch.randn(b, 1, (heads + 2 * kv) * d, device="cuda", generator=g).to(dtype)
        ang = torch.randn(b, 1, d // 2, device="cuda", generator=g)
        cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
        store = torch.randn(2, b, kv, cap, d, device="cuda", generator=g).to(dtype)
        mask = torch.rand(b, cap, device="cuda", generator=g) < 0.7
        cols = torch.randint(0, span, (b,), device="cuda", generator=g)
        mask[torch.arange(b, device="cuda"), cols] = True
        keys, values = store[0].clone(), store[1].clone()
        q = tk.decode_rope_write(qkv, cos.reshape(b, d), sin.reshape(b, d), keys, values, cols, heads)
        rq = qkv[..., : heads * d].view(b, 1, heads, d).transpose(1, 2)
        rk = qkv[..., heads * d : (heads + kv) * d].view(b, 1, kv, d).transpose(1, 2)
        rv = qkv[..., (heads + kv) * d :].view(b, 1, kv, d).transpose(1, 2)
        q_ref, k_ref = rope(rq.float(), rk.float(), cos.float(), sin.float())
        keys_ref, values_ref = store[0].clone(), store[1].clone()
        rows = torch.arange(b, device="cuda")
        keys_ref[rows, :, cols] = k_ref[:, :, 0].to(dtype)
        values_ref[rows, :, cols] = rv[:, :, 0]
        assert torch.allclose(q.float(), q_ref[:, :, 0].to(dtype).float(), **tol)
        assert torch.allclose(keys.float(), keys_ref.float(), **tol) and torch.equal(values, values_ref)
        bias = attention_bias(mask[:, None, None, :span], heads // kv, dtype)
        want = grouped_attention(q[:, :, None], keys_ref[:, :, :span], values_ref[:, :, :span], bias, d**-0.5)
        for chunk in (0, 64, 128):
            o = tk.decode_attention(q, keys, values, mask, span, d**-0.5, chunk=chunk)
            assert torch.allclose(o.float(), want[:, :, 0].float(), **tol), (
                chunk,
                (o.float() - want[:, :, 0].float()).abs().max(),
            )


def test_decode_kernels_decode_the_tokens_of_sdpa(tiny_qwen2_vl):
    """decode_attention=triton through the engine (decode graphs), whole and split
    (decode_split=64): the greedy tokens of the SDPA step, fp32."""
    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.options import EngineOptions
    from inference_worker.engines.sampling import Sampling
    from inference_worker.models import load_vlm

    vlm = load_vlm(tiny_qwen2_vl, device="cuda", dtype="float32")
    prompts, samp = _prompts(), [Sampling(max_tokens=10)] * 6
    ref = ChatEngine(vlm, EngineOptions(decode_attention="sdpa"))
    want = [c.token_ids for c in ref.generate(prompts, samp)]
    for split in (0, 64):
        engine = ChatEngine(vlm, EngineOptions(decode_attention="triton", decode_split=split))
        assert engine.stack.decode_kernels and not ref.stack.decode_kernels
        assert [c.token_ids for c in engine.generate(prompts, samp)] == want, split


def test_rope_triton_decodes_the_tokens_of_the_compiled_rope(tiny_qwen2_vl):
    """rope=triton through the engine (prompt pass and decode graphs): the greedy tokens of
    the compiled rotary, fp32; auto (the default) picks the kernel on CUDA."""
    from inference_worker.engines import triton_kernels
    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.options import EngineOptions
    from inference_worker.engines.sampling import Sampling
    from inference_worker.models import load_vlm

    vlm = load_vlm(tiny_qwen2_vl, device="cuda", dtype="float32")
    prompts, samp = _prompts(), [Sampling(max_tokens=10)] * 6
    want = [c.token_ids for c in ChatEngine(vlm, EngineOptions(rope="torch")).generate(prompts, samp)]
    engine = ChatEngine(vlm, EngineOptions())
    assert engine.stack.k.rope is triton_kernels.rope
    assert [c.token_ids for c in engine.generate(prompts, samp)] == want


def test_upload_many_gives_each_array_exactly():
    """Arrays of several dtypes and shapes (sizes not a multiple of the alignment, an empty one, a
    non-contiguous view) through one pinned buffer: each arrives as torch.from_numpy gives it,
    batch after batch."""
    from inference_worker.engines.upload import upload_many

    rs = np.random.RandomState(3)
    for n in (1, 5, 37):
        arrays = [
            rs.randint(0, 1 << 40, (n, 7)),
            rs.randint(0, 100, (n, 3)).astype(np.int32),
            rs.randint(0, 100, (3, n, 5))[:, :, ::2],
            np.zeros(0, np.int64),
            np.flatnonzero(rs.rand(n * 4) < 0.5),
        ]
        got = upload_many(arrays, torch.device("cuda"))
        for g, a in zip(got, arrays):
            want = torch.from_numpy(np.ascontiguousarray(a))
            assert g.device.type == "cuda" and g.dtype == want.dtype and g.shape == want.shape
            assert torch.equal(g.cpu(), want)


def test_frame_staging_uploads_each_batch_exactly():
    """Frames stacked into a reused pinned buffer arrive as np.stack gives them, batch after
    batch of one shape (the buffer refilled while earlier copies may still be queued), for
    RGB views of RGBA frames too."""
    from inference_worker.engines.upload import FrameStaging

    staging, dev = FrameStaging(max_buffers=2), torch.device("cuda")
    rs = np.random.RandomState(7)
    outs, wants = [], []
    for n, channels in ((8, 3), (8, 3), (3, 4), (8, 3), (1, 3)):
        frames = [rs.randint(0, 256, (64, 48, channels), dtype=np.uint8)[..., :3] for _ in range(n)]
        outs.append(staging.upload(frames, dev))
        wants.append(np.stack(frames))
    torch.cuda.synchronize()
    for out, want in zip(outs, wants):
        assert out.device.type == "cuda" and np.array_equal(out.cpu().numpy(), want)
