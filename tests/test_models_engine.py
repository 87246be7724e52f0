"""The chat engine on tiny random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints (real
architectures), fp32 CPU.

The engine patches the model it serves, so every parity check compares it with a pristine
reference: the same folder loaded a second time and never handed to an engine."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from inference_worker.engines.chat_engine import ChatEngine  # noqa: E402
from inference_worker.engines.options import EngineOptions  # noqa: E402
from inference_worker.engines.parity import compare_topk, engine_trace, reference_trace  # noqa: E402
from inference_worker.engines.pixels import ImagePolicy, pixel_values  # noqa: E402
from inference_worker.engines.prompt import user_prompt  # noqa: E402
from inference_worker.engines.sampling import Sampling  # noqa: E402
from inference_worker.models import load_vlm  # noqa: E402

SIZES = [(224, 224), (64, 64), (100, 37), (224, 224), (300, 500), (48, 48), (224, 224), (80, 120)]


ARCHES = ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_qwen3_vl"]


@pytest.fixture(scope="module", params=ARCHES)
def pair(request):
    """(engine, pristine): the engine on one load of the folder, and a second load of the
    same folder that no engine touches, the reference of every parity check."""
    folder = request.getfixturevalue(request.param)
    return ChatEngine(load_vlm(folder)), load_vlm(folder)


@pytest.fixture(scope="module")
def engine(pair):
    return pair[0]


@pytest.fixture(scope="module")
def pristine(pair):
    return pair[1]


def near(ours, ref, rel: float = 1e-5) -> bool:
    """Equal up to fp32 rounding at the tensor's scale: the engine sums in another order (one
    GEMM for the Conv3d patch embedding, batched attention), and the tiny towers' wide init
    gives features near 100, where single elements near zero make elementwise rtol moot."""
    return (ours - ref).abs().max().item() <= rel * ref.abs().max().item()


def stock_kwargs(batch, extra=None):
    """The model inputs of a built batch without the engine's positions (the stock forward
    computes its own), optionally followed by text tokens `extra` (B, T)."""
    kw = batch.model_kwargs()
    kw.pop("position_ids")
    if extra is not None:
        kw["input_ids"] = torch.cat([batch.input_ids, extra], 1)
        kw["attention_mask"] = torch.cat([batch.attention_mask, torch.ones_like(extra)], 1)
        kw["mm_token_type_ids"] = torch.cat([batch.mm_token_type_ids, torch.zeros_like(extra).int()], 1)
    return kw


def frames():
    rs = np.random.RandomState(7)
    return [rs.randint(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def mixed_prompts():
    """8 prompts: different image sizes and text lengths, one text-only, one with two images."""
    imgs = frames()
    prompts = [
        user_prompt(img, "What should the agent do next? " * (1 + i % 3)) for i, img in enumerate(imgs[:6])
    ]
    prompts.append(user_prompt("A text-only question about the task."))
    prompts.append(user_prompt("Image 1:", imgs[6], "Image 2:", imgs[7], "Which is better?"))
    return prompts


def test_pixels_match_the_stock_image_processor(engine):
    ip = engine.vlm.processor.image_processor
    imgs = frames()
    ref = ip(images=imgs, return_tensors="pt")
    values, grid = pixel_values(imgs, ImagePolicy.from_image_processor(ip))
    assert torch.equal(grid, ref["image_grid_thw"])
    assert torch.allclose(values, ref["pixel_values"], atol=1e-5)


def test_inputs_match_the_stock_processor(engine):
    """Ids, masks, grids and M-RoPE positions as the processor and get_rope_index give them,
    with rows repeated (positions are cached per row shape) and built twice."""
    proc = engine.vlm.processor
    prompts = mixed_prompts()[:6]
    prompts = prompts + prompts[1:3]
    texts = [
        proc.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    ref = proc(text=texts, images=[i for p in prompts for i in p.images], padding=True, return_tensors="pt")
    ours = engine.inputs.build(prompts)
    for name in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(getattr(ours, name).cpu(), ref[name].to(getattr(ours, name).dtype)), name
    pos, deltas = engine.model.model.get_rope_index(
        ref["input_ids"],
        mm_token_type_ids=ref["mm_token_type_ids"],
        image_grid_thw=ref["image_grid_thw"],
        attention_mask=ref["attention_mask"],
    )
    for built in (ours, engine.inputs.build(prompts)):
        assert torch.equal(built.position_ids.cpu(), pos)
        assert torch.equal(built.next_positions.cpu(), deltas[:, 0] + ref["attention_mask"].sum(1))


def test_image_token_counts_follow_the_release_policy(tiny_qwen2_vl, tiny_qwen2_5_vl, tiny_qwen3_vl):
    counts = {}
    for name, folder in (
        ("qwen2-vl", tiny_qwen2_vl),
        ("qwen2.5-vl", tiny_qwen2_5_vl),
        ("qwen3-vl", tiny_qwen3_vl),
    ):
        policy = ImagePolicy.from_image_processor(load_vlm(folder).processor.image_processor)
        counts[name] = [policy.num_tokens(s, s) for s in (64, 224, 384)]
    assert counts == {"qwen2-vl": [4, 64, 196], "qwen2.5-vl": [4, 64, 196], "qwen3-vl": [64, 64, 144]}
    capped = ImagePolicy.from_image_processor(
        load_vlm(tiny_qwen2_vl).processor.image_processor, max_pixels=112 * 112
    )
    assert capped.num_tokens(384, 384) == 9  # 84 x 84 px: smart_resize keeps under max_pixels


def test_the_reference_is_not_patched(engine, pristine):
    """What the engine changes on its model, and that the pristine copy has none of it."""
    from inference_worker.engines.fused_linear import ATTR
    from inference_worker.engines.vision_attention import NAME

    assert engine.model.model.visual.config._attn_implementation == NAME
    assert pristine.model.model.visual.config._attn_implementation == "sdpa"
    assert "forward" in vars(engine.model.model.visual.patch_embed)
    assert "forward" not in vars(pristine.model.model.visual.patch_embed)
    assert hasattr(engine.model.model.language_model.layers[0], ATTR)
    assert not hasattr(pristine.model.model.language_model.layers[0], ATTR)


def test_text_stack_matches_the_full_forward(engine, pristine):
    """Continuing from the prefill cache with our static-cache stack gives the logits of
    the stock forward over the whole sequence."""
    prompts = mixed_prompts()[:3]
    batch = engine.inputs.build(prompts)
    cont = torch.tensor([[5, 9, 11, 4]] * batch.batch)
    with torch.inference_mode():
        cache = engine.stack.new_cache(batch.batch, batch.length + cont.shape[1])
        engine._prefill_into(cache, batch, padded=False)
        pos = batch.next_positions[:, None] + torch.arange(cont.shape[1])
        ours = engine.stack.forward(cache, cont, pos, torch.tensor(batch.length))
        ref = pristine.model(**stock_kwargs(batch, cont)).logits[:, -cont.shape[1] :].float()
    # at the logits' scale: both sides sum in their own order over random weights (up to
    # 4e-4 of it seen on an AMD EPYC host, varying between processes); a wrong position or
    # a stale cache column is off by the scale itself
    assert near(ours, ref, rel=1e-3)


def test_greedy_matches_the_stock_forward(engine, pristine):
    """The engine's greedy tokens are the stock forward's (inputs from the stock processor),
    and teacher-forced on them its log-probabilities are the stock ones (fp32: same argmax
    at every step, 1e-3 over each step's top 5)."""
    prompts = mixed_prompts()
    for prompt in (prompts[0], prompts[-1]):  # one image; two images of other sizes
        ours = engine.generate([prompt], [Sampling(max_tokens=10)])[0]
        ref = reference_trace(pristine, prompt, max_tokens=10)
        assert ours.token_ids == ref.tokens[: len(ours.token_ids)]
        report = compare_topk(ref, engine_trace(engine, prompt, ref.tokens), k=5)
        assert report.argmax_agreement == 1.0 and report.close
        assert report.max_abs_diff < 1e-3, report


def test_engine_trace_survives_a_reused_step_output(engine, monkeypatch):
    """A CUDA-graph replay returns its static output buffer, and the next replay overwrites
    it (the decode's logits are float32 already, so `.float()` is no copy). engine_trace
    must give the same log-probabilities when every step returns one reused buffer."""
    prompt = mixed_prompts()[0]
    tokens = engine.generate([prompt], [Sampling(max_tokens=6)])[0].token_ids
    plain = engine_trace(engine, prompt, tokens)
    d = engine.decoder
    step = d._forward
    out: dict = {}

    def replay(n, span):
        logits = step(n, span)
        buf = out.setdefault("buf", torch.empty_like(logits))
        return buf.copy_(logits)

    monkeypatch.setattr(d, "_forward", replay)
    replayed = engine_trace(engine, prompt, tokens)
    assert len(tokens) > 2 and torch.equal(plain.logprobs, replayed.logprobs)


def test_greedy_matches_transformers_generate(engine, pristine):
    prompt = mixed_prompts()[0]
    ours = engine.generate([prompt], [Sampling(max_tokens=10)])[0]
    batch = engine.inputs.build([prompt])
    ref = pristine.model.generate(**stock_kwargs(batch), max_new_tokens=10, do_sample=False)
    assert ours.token_ids == ref[0, batch.length :].tolist()[: len(ours.token_ids)]


def test_batched_greedy_equals_unbatched_token_for_token(engine):
    prompts = mixed_prompts()
    samp = [Sampling(max_tokens=12)] * len(prompts)
    batched = engine.generate(prompts, samp)
    alone = [engine.generate([p], [s])[0] for p, s in zip(prompts, samp)]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert len({tuple(b.token_ids) for b in batched}) > 1, "the model answers every prompt alike"
    assert [b.prompt_tokens for b in batched] == [a.prompt_tokens for a in alone]


def test_per_request_settings_in_one_batch(engine):
    prompts = mixed_prompts()[:4]
    greedy = engine.generate([prompts[1]], [Sampling(max_tokens=8)])[0]
    stop_at = engine.tokenizer.decode(greedy.token_ids[3:5], skip_special_tokens=True)
    samp = [
        Sampling(max_tokens=3),
        Sampling(max_tokens=8, stop=(stop_at,)) if stop_at.strip() else Sampling(max_tokens=8),
        Sampling(max_tokens=6, temperature=1.0, top_p=0.9, seed=5),
        Sampling(max_tokens=6, temperature=1.0, top_p=0.9, seed=5),
    ]
    out = engine.generate(prompts, samp)
    assert out[0].completion_tokens <= 3
    if stop_at.strip():
        assert stop_at not in out[1].text and out[1].finish_reason == "stop"
    # a seeded sampled request does not depend on its batch-mates
    again = engine.generate([prompts[2]], [samp[2]])[0]
    assert out[2].token_ids == again.token_ids
    for c in out:
        assert c.finish_reason in ("stop", "length") and c.prompt_tokens > 0


def test_candidate_scores_are_summed_log_probs_in_context(engine, pristine):
    prompts = mixed_prompts()[:2]
    cands = [["go to fridge 1", "look", "-1"], ["0", "1", "-1", "move_left"]]
    scored = engine.score(prompts, cands)
    for prompt, cs, s in zip(prompts, cands, scored):
        batch = engine.inputs.build([prompt])
        for cand, got in zip(cs, s.scores):
            ids = engine.tokenizer(cand, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logits = pristine.model(**stock_kwargs(batch, torch.tensor([ids]))).logits
            logp = torch.log_softmax(logits[0].float(), -1)
            want = sum(logp[batch.length - 1 + j, t].item() for j, t in enumerate(ids))
            assert got == pytest.approx(want, abs=1e-3)
        assert s.prompt_tokens == batch.attention_mask.sum().item()
    assert engine.tokenizer("-1", add_special_tokens=False)["input_ids"].__len__() == 2


def test_options_parse_flags_and_environment():
    opts = EngineOptions.parse(
        {"max_pixels": "50176", "decode": "eager", "vla": "elsewhere"}, {"VLMQ_ENGINE_IGNORE_EOS": "1"}
    )
    assert (opts.max_pixels, opts.decode, opts.ignore_eos) == (50176, "eager", True)
    with pytest.raises(ValueError, match="decode"):
        EngineOptions.parse({"decode": "fast"}, {})


def test_packed_vision_attention_matches_sdpa(engine, pristine):
    """The engine batches the vision tower's attention across images (vision_attention.py);
    the image features equal those of transformers' per-image SDPA (the pristine tower)."""
    from inference_worker.engines.vision_attention import NAME

    assert engine.model.model.visual.config._attn_implementation == NAME
    values, grid = pixel_values(frames(), engine.policy)
    with torch.inference_mode():
        packed = torch.cat(engine.model.model.get_image_features(values, grid).pooler_output)
        stock = torch.cat(pristine.model.model.get_image_features(values, grid).pooler_output)
    assert near(packed, stock)


def test_own_prefill_matches_the_full_forward(engine, pristine):
    """The engine's prompt pass (vision plans + text stack, straight into the decode cache)
    gives the last-token logits of the stock forward; Qwen3-VL (deepstack) keeps
    transformers' pass."""
    from inference_worker.engines.vision_encoder import has_deepstack

    assert engine.own_prefill == (not has_deepstack(engine.model))
    assert engine.own_prefill == (engine.model.config.model_type != "qwen3_vl")
    batch = engine.inputs.build(mixed_prompts())
    with torch.inference_mode():
        cache = engine.stack.new_cache(batch.batch, batch.length)
        ours = engine._prefill_into(cache, batch, padded=False)[0]
        ref = pristine.model(**stock_kwargs(batch)).logits[:, -1].float()
    # the image features differ from the stock tower's at fp32 rounding (near() above),
    # and a 2-layer model with a wide init carries that to ~2e-5 of its logits' scale
    assert near(ours, ref, rel=5e-5)


def test_own_prefill_is_refused_for_deepstack_models(tiny_qwen3_vl):
    with pytest.raises(ValueError, match="deepstack"):
        ChatEngine(load_vlm(tiny_qwen3_vl), EngineOptions(prefill="stack"))


def test_vision_encoder_matches_the_stock_image_features(engine, pristine):
    """Mixed sizes (packed attention per length) and one size (a view, no cu_seqlens read)."""
    for imgs in (frames(), [frames()[0]] * 3):
        batch = engine.inputs.build([user_prompt(i, "x") for i in imgs])
        with torch.inference_mode():
            ours = engine.vision(batch.pixel_values, batch.grids, batch.image_grid_thw)
            ref = torch.cat(
                pristine.model.model.get_image_features(
                    batch.pixel_values, batch.image_grid_thw
                ).pooler_output
            )
        assert near(ours, ref)


def test_padded_vision_pass_gives_each_frame_its_own_features(engine):
    """vision_graphs: a group of one frame size padded to its bucket of frames (3 -> 4) gives
    the real frames the features they get at the group's own size; groups it can't pad (mixed
    sizes, or a tower that isn't sync-free) run the tower as they are."""
    from inference_worker.engines.vision_graphs import VisionGraphs

    padded = VisionGraphs(engine.vision, "padded")
    rs = np.random.RandomState(3)
    same = [rs.randint(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(3)]
    for imgs in (same, frames()):
        batch = engine.inputs.build([user_prompt(i, "x") for i in imgs])
        with torch.inference_mode():
            ref = engine.vision(batch.pixel_values, batch.grids, batch.image_grid_thw)
            ours = padded(batch.pixel_values, batch.grids, batch.image_grid_thw)
        assert ours.shape == ref.shape and near(ours, ref)
    assert padded._bucket(batch.grids) is None  # mixed sizes: not padded
    pads = padded._bucket([(1, 8, 8)] * 3)
    assert pads == ((1, 8, 8), 4)


def test_padded_prefill_decodes_the_tokens_of_the_groups_own_shape(tiny_qwen2_vl):
    """prefill_graphs: a group's prompts padded to a width bucket and its rows to a rows
    bucket give every prompt the greedy tokens of the unpadded pass, whatever the group's
    size (1; 3 as passes of 2 and 1, 5 of 4 and 1) and with rows joining a running decode; a
    group past the token budget runs unpadded."""
    from inference_worker.engines.prefill_graphs import PrefillGraphs

    vlm = load_vlm(tiny_qwen2_vl)
    plain = ChatEngine(vlm)
    padded = ChatEngine(load_vlm(tiny_qwen2_vl), EngineOptions(prefill_graphs="padded"))
    prompts = mixed_prompts()
    passes = []
    admit = padded._admit
    padded._admit = lambda keys, *rest: passes.append(len(keys)) or admit(keys, *rest)
    for group in (prompts[:1], prompts[1:4], prompts[3:8]):
        samp = [Sampling(max_tokens=6)] * len(group)
        assert [c.token_ids for c in padded.generate(group, samp)] == [
            c.token_ids for c in plain.generate(group, samp)
        ]
    assert passes == [1, 2, 1, 4, 1]  # not 4 and 8 padded rows
    # where padding wastes less than another pass costs, the group stays whole; no padding, no split
    assert padded.prefill_pass.pieces(23, 100) == [23] and plain.prefill_pass.pieces(5, 100) == [5]
    together, _ = _run_continuously(
        padded, [(0, prompts[0], Sampling(max_tokens=9)), (2, prompts[5], Sampling(max_tokens=4))]
    )
    alone = [plain.generate([p], [Sampling(max_tokens=n)])[0] for p, n in ((prompts[0], 9), (prompts[5], 4))]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    # the decode starts at the bucket's width: a multiple of the width step
    batch = padded.inputs.build(prompts[1:4])
    with torch.inference_mode():
        logits, width = padded._prefill_into(padded.decoder.reserve(3), batch)
    assert width % padded.prefill_pass.width_step == 0 and width >= batch.length and logits.shape[0] == 3
    small = PrefillGraphs(padded.stack, "padded", max_tokens=batch.length)
    with torch.inference_mode():
        assert (
            small(padded.decoder.reserve(3), padded.embed(batch), batch.position_ids, batch.attention_mask)[1]
            == batch.length
        )


def test_a_width_step_of_one_pads_no_columns(tiny_qwen2_vl):
    """prefill_width_step=1: a group decodes from its longest prompt's width, with the
    tokens of the unpadded pass; a step below 1 is refused."""
    vlm = load_vlm(tiny_qwen2_vl)
    exact = ChatEngine(vlm, EngineOptions(prefill_graphs="padded", prefill_width_step=1))
    prompts = mixed_prompts()[1:4]
    batch = exact.inputs.build(prompts)
    with torch.inference_mode():
        _, width = exact._prefill_into(exact.decoder.reserve(3), batch)
    assert width == batch.length
    samp = [Sampling(max_tokens=6)] * 3
    want = [c.token_ids for c in ChatEngine(vlm).generate(prompts, samp)]
    assert [c.token_ids for c in exact.generate(prompts, samp)] == want
    with pytest.raises(ValueError, match="prefill_width_step=0"):
        ChatEngine(vlm, EngineOptions(prefill_graphs="padded", prefill_width_step=0))


def test_vision_graphs_need_a_gpu(tiny_qwen2_vl):
    with pytest.raises(ValueError, match="vision_graphs=on needs a CUDA device"):
        ChatEngine(load_vlm(tiny_qwen2_vl), EngineOptions(vision_graphs="on"))
    with pytest.raises(ValueError, match="prefill_graphs=on needs a CUDA device"):
        ChatEngine(load_vlm(tiny_qwen2_vl), EngineOptions(prefill_graphs="on"))
    with pytest.raises(ValueError, match="decode_attention=triton needs a CUDA device"):
        ChatEngine(load_vlm(tiny_qwen2_vl), EngineOptions(decode_attention="triton"))
    # auto (the default) is SDPA where the Triton kernels can't run
    assert not ChatEngine(load_vlm(tiny_qwen2_vl), EngineOptions(fuse="on")).stack.decode_kernels


def test_fused_projections_are_slices_of_one_weight(engine, pristine):
    """q/k/v and gate/up run as one GEMM each; the model's modules now hold row slices of
    those weights (nothing held twice) and compute what the pristine modules compute."""
    layer, fused = engine.stack.layers[0], engine.stack.fused[0]
    attn, mlp = layer.self_attn, layer.mlp
    ref_layer = pristine.model.model.language_model.layers[0]
    assert fused is not None and fused.gate_up_weight is not None
    assert attn.q_proj.weight.data_ptr() == fused.qkv_weight.data_ptr()
    assert attn.v_proj.weight.data_ptr() == fused.qkv_weight[-attn.v_proj.out_features :].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == fused.gate_up_weight[mlp.gate_proj.out_features :].data_ptr()
    x = torch.randn(3, attn.q_proj.in_features)
    with torch.no_grad():
        ra, rm = ref_layer.self_attn, ref_layer.mlp
        ref = torch.cat([ra.q_proj(x), ra.k_proj(x), ra.v_proj(x)], dim=-1)
        ours = torch.nn.functional.linear(x, fused.qkv_weight, fused.qkv_bias)
        assert torch.allclose(ours, ref)
        gu = torch.nn.functional.linear(x, fused.gate_up_weight)
        assert torch.allclose(gu, torch.cat([rm.gate_proj(x), rm.up_proj(x)], dim=-1))


def test_linear_patch_embedding_matches_the_conv(engine, pristine):
    values, _ = pixel_values(frames()[:2], engine.policy)
    with torch.inference_mode():
        ours = engine.model.model.visual.patch_embed(values)
        conv = pristine.model.model.visual.patch_embed(values)
    assert near(ours, conv.view(values.shape[0], -1))


def _run_continuously(engine, plan):
    """plan: [(step at which to admit, prompt, sampling)]; returns each one's completion and
    the step at which it finished."""
    out, finished_at = {}, {}
    keys = [object() for _ in plan]
    step = 0

    def collect(done):
        for key, completion in done:
            i = keys.index(key)
            out[i], finished_at[i] = completion, step

    while len(out) < len(plan):
        for i, (at, prompt, samp) in enumerate(plan):
            if at == step:
                engine.check(prompt)
                collect(engine.admit([keys[i]], [prompt], [samp]))
        collect(engine.step())
        step += 1
    return [out[i] for i in range(len(plan))], [finished_at[i] for i in range(len(plan))]


def test_joining_a_running_decode_gives_the_tokens_of_decoding_alone(engine):
    """Sequences admitted at different steps of one running decode, with different prompt
    lengths and max_tokens, each get exactly the greedy tokens they get alone; the short
    ones leave the pool (and are reported) while the long one is still decoding."""
    prompts = mixed_prompts()
    plan = [
        (0, prompts[0], Sampling(max_tokens=24)),
        (3, prompts[7], Sampling(max_tokens=5)),  # two images, joins mid-decode
        (3, prompts[6], Sampling(max_tokens=9)),  # text only, same step
        (7, prompts[4], Sampling(max_tokens=4)),
    ]
    together, finished_at = _run_continuously(engine, plan)
    alone = [engine.generate([p], [s])[0] for _, p, s in plan]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    # each is reported one step after the step its last token came out (its first comes from
    # the prompt pass at admission, each later one from one step; a step's tokens are read
    # once the next step is launched), whatever else is still decoding
    assert finished_at == [at + max(0, len(c.token_ids) - 1) for (at, _, _), c in zip(plan, together)]
    assert engine.running == 0 and engine.free_slots == engine.decoder.slots


def test_abort_frees_the_slot_and_others_continue(engine):
    prompts = mixed_prompts()
    a, b = object(), object()
    for p in prompts[:2]:
        engine.check(p)
    engine.admit([a, b], prompts[:2], [Sampling(max_tokens=30), Sampling(max_tokens=6)])
    engine.step()
    assert engine.abort([a]) == [a]
    assert engine.running == 1
    done = []
    while engine.running:
        done += engine.step()
    alone = engine.generate([prompts[1]], [Sampling(max_tokens=6)])[0]
    assert [k for k, _ in done] == [b] and done[0][1].token_ids == alone.token_ids


def test_upload_many_packs_each_array_exactly():
    """Arrays of several dtypes and shapes (sizes not a multiple of the alignment, an empty one, a
    non-contiguous view) packed into one buffer come back as torch.from_numpy gives them (the
    CPU runs the packing the GPU path uses; tests/test_models_gpu.py checks the copy)."""
    from inference_worker.engines.upload import ALIGN, upload_many

    rs = np.random.RandomState(3)
    arrays = [
        rs.randint(0, 1 << 40, (5, 7)),
        rs.randint(0, 100, (5, 3)).astype(np.int32),
        rs.randint(0, 100, (3, 5, 5))[:, :, ::2],
        np.zeros(0, np.int64),
        np.flatnonzero(rs.rand(20) < 0.5),
        np.arange(3, dtype=np.uint8),
    ]
    got = upload_many(arrays, torch.device("cpu"))
    for g, a in zip(got, arrays):
        want = torch.from_numpy(np.ascontiguousarray(a))
        assert g.dtype == want.dtype and g.shape == want.shape and torch.equal(g, want)
        assert (g.data_ptr() - got[0].data_ptr()) % ALIGN == 0
