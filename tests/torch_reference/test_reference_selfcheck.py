"""Self-checks of the PyTorch reference (tests/torch_reference/causal_wan.py) on a tiny config."""

import math

import pytest
import torch

from .causal_wan import (
    CausalWanModel,
    add_noise,
    flow_match_sigmas,
    flow_to_x0,
    randomize_parameters_,
    rolling_kv_cache_update,
    rope_table,
    self_forcing_rollout,
    sigma_for_timestep,
    warped_denoising_steps,
)

TINY = dict(dim=192, ffn_dim=64, num_heads=12, num_layers=2, in_dim=4, out_dim=4, text_dim=32, freq_dim=32)
H = W = 8  # latent grid -> 4 x 4 = 16 tokens per frame
TPF = (H // 2) * (W // 2)


def expected_shapes(dim, ffn_dim, num_layers, in_dim, out_dim, text_dim, freq_dim, patch=(1, 2, 2)):
    """Facts section 2, written out per layer."""
    shapes = {
        "patch_embedding.weight": (dim, in_dim, *patch),
        "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim),
        "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim),
        "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim),
        "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim),
        "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim),
        "time_projection.1.bias": (6 * dim,),
        "head.modulation": (1, 2, dim),
        "head.head.weight": (out_dim * math.prod(patch), dim),
        "head.head.bias": (out_dim * math.prod(patch),),
    }
    for n in range(num_layers):
        p = f"blocks.{n}."
        shapes[p + "modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for lin in "qkvo":
                shapes[f"{p}{attn}.{lin}.weight"] = (dim, dim)
                shapes[f"{p}{attn}.{lin}.bias"] = (dim,)
            shapes[f"{p}{attn}.norm_q.weight"] = (dim,)
            shapes[f"{p}{attn}.norm_k.weight"] = (dim,)
        shapes[p + "norm3.weight"] = (dim,)
        shapes[p + "norm3.bias"] = (dim,)
        shapes[p + "ffn.0.weight"] = (ffn_dim, dim)
        shapes[p + "ffn.0.bias"] = (ffn_dim,)
        shapes[p + "ffn.2.weight"] = (dim, ffn_dim)
        shapes[p + "ffn.2.bias"] = (dim,)
    return shapes


def tiny_model(**kw):
    torch.manual_seed(0)
    return randomize_parameters_(CausalWanModel(**TINY, **kw), seed=1, std=0.1).eval()


def tiny_inputs(frames=3, batch=1, text_tokens=7, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_dim"], frames, H, W, generator=g)
    ctx = torch.randn(batch, text_tokens, TINY["text_dim"], generator=g)
    return x, ctx


def test_state_dict_tiny_matches_facts():
    sd = CausalWanModel(**TINY).state_dict()
    want = expected_shapes(
        **{k: TINY[k] for k in ("dim", "ffn_dim", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim")}
    )
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert "freqs" not in sd


def test_real_config_on_meta_device():
    with torch.device("meta"):
        model = CausalWanModel()
    sd = model.state_dict()
    assert len(sd) == 825
    assert sum(v.numel() for v in sd.values()) == 1_418_996_800
    want = expected_shapes(1536, 8960, 30, 16, 16, 4096, 256)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert model.freqs.shape == (1024, 64) and model.freqs.dtype == torch.complex128


def test_rope_table():
    for head_dim, split in ((16, (4, 2, 2)), (128, (22, 21, 21))):
        freqs = rope_table(head_dim)
        assert freqs.shape == (1024, head_dim // 2) and freqs.dtype == torch.complex128
        # Facts section 4: table[p, j] = exp(i p 10000^(-2j/D_part)) within each of the t/h/w parts.
        start = 0
        for pairs in split:
            j = torch.arange(pairs, dtype=torch.float64)
            want = torch.polar(torch.ones(pairs, dtype=torch.float64), 7 * 10000.0 ** (-2 * j / (2 * pairs)))
            torch.testing.assert_close(freqs[7, start : start + pairs], want)
            start += pairs


def test_unpatchify_inverts_patchify_order():
    model = CausalWanModel(**TINY)
    c, f, h, w = TINY["out_dim"], 3, H // 2, W // 2
    video = torch.randn(2, c, f, H, W)
    # token (f, h, w) holds values (p, q, r, c) with c fastest (facts section 3.6)
    tokens = video.view(2, c, f, 1, h, 2, w, 2).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(2, f, h * w, 4 * c)
    torch.testing.assert_close(model.unpatchify(tokens, (f, h, w)), video)


def test_scheduler():
    timesteps, sigmas = flow_match_sigmas()
    assert timesteps.dtype == sigmas.dtype == torch.float32 and timesteps.shape == (1000,)
    assert timesteps[0].item() == 1000.0 and abs(timesteps[-1].item() - 4.98) < 0.01
    steps = warped_denoising_steps([1000, 750, 500, 250], 5.0)
    torch.testing.assert_close(steps, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]))
    torch.testing.assert_close(sigma_for_timestep(steps), torch.tensor([1.0, 0.9375, 5 / 6, 0.625]))
    x0, eps = torch.randn(1, 3, 4, 2, 2), torch.randn(1, 3, 4, 2, 2)
    xt = add_noise(x0, eps, 937.5)
    torch.testing.assert_close(xt, 0.0625 * x0 + 0.9375 * eps)
    torch.testing.assert_close(flow_to_x0(eps - x0, xt, torch.full((1, 3), 937.5)), x0)


@pytest.mark.parametrize("start_frame", [0, 2])
def test_empty_cache_forward_equals_no_cache(start_frame):
    model = tiny_model()
    x, ctx = tiny_inputs()
    t = torch.full((1, 3), 937.5)
    with torch.no_grad():
        ref = model(x, t, ctx, current_start=start_frame * TPF)
        cache = model.init_kv_cache(1, 6 * TPF, start_token=start_frame * TPF)
        cross = model.init_crossattn_cache(1, ctx.shape[1])
        out = model(x, t, ctx, kv_cache=cache, crossattn_cache=cross, current_start=start_frame * TPF)
        # a repeated call on the same block overwrites the same slots (facts section 5)
        again = model(x, t, ctx, kv_cache=cache, crossattn_cache=cross, current_start=start_frame * TPF)
    assert out.shape == (1, TINY["out_dim"], 3, H, W)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-5)
    assert all(c["local_end_index"].item() == 3 * TPF for c in cache)
    assert all(c["global_end_index"].item() == (start_frame + 3) * TPF for c in cache)
    assert all(c["is_init"] for c in cross)


def test_rope_offset_changes_output():
    model = tiny_model()
    x, ctx = tiny_inputs()
    t = torch.full((1, 3), 500.0)
    with torch.no_grad():
        assert not torch.allclose(model(x, t, ctx), model(x, t, ctx, current_start=5 * TPF))


def test_rollout_start_frame_first_block_matches_single_forward():
    model = tiny_model()
    _, ctx = tiny_inputs()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 6, TINY["in_dim"], H, W, generator=g)
    eps = {(j, k): torch.randn(1, 3, TINY["in_dim"], H, W, generator=g) for j in range(2) for k in range(3)}
    steps = warped_denoising_steps()
    with torch.no_grad():
        out = self_forcing_rollout(model, noise, ctx, steps, lambda j, k: eps[(j, k)], start_frame=4)
        # block 0 sees only itself: replay it without a cache, RoPE offset by start_frame
        x = noise[:, :3]
        for k, t_k in enumerate(steps.tolist()):
            t = torch.full((1, 3), t_k)
            flow = model(x.permute(0, 2, 1, 3, 4), t, ctx, current_start=4 * TPF).permute(0, 2, 1, 3, 4)
            x0 = flow_to_x0(flow, x, t)
            if k < 3:
                x = add_noise(x0, eps[(0, k)], steps[k + 1].item())
    torch.testing.assert_close(out[:, :3], x0, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all() and out[:, 3:].abs().sum() > 0


def test_rolling_local_attention_with_sink():
    model = tiny_model(local_attn_size=6, sink_size=1)
    _, ctx = tiny_inputs()
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1, 12, TINY["in_dim"], H, W, generator=g)  # 4 blocks > 2-block window
    with torch.no_grad():
        out = self_forcing_rollout(
            model,
            noise,
            ctx,
            warped_denoising_steps(),
            lambda j, k: torch.randn(1, 3, TINY["in_dim"], H, W, generator=g),
            local_attn_size=6,
            sink_size=1,
        )
    assert out.shape == noise.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        self_forcing_rollout(model, noise, ctx, [1000.0], lambda j, k: None)  # window mismatch


def test_rolling_cache_indices():
    model = tiny_model(local_attn_size=6, sink_size=1)
    x, ctx = tiny_inputs()
    t = torch.zeros(1, 3)
    cache = model.init_kv_cache(1, 6 * TPF)
    with torch.no_grad():
        for blk in range(3):
            model(x, t, ctx, kv_cache=cache, current_start=3 * blk * TPF)
            if blk == 1:
                before = cache[0]["k"].clone()
    # third block evicts 3 frames after the 1-frame sink: frames [4, 6) move to [1, 3), new block at [3, 6)
    k = cache[0]["k"]
    torch.testing.assert_close(k[:, :TPF], before[:, :TPF])
    torch.testing.assert_close(k[:, TPF : 3 * TPF], before[:, 4 * TPF : 6 * TPF])
    assert cache[0]["local_end_index"].item() == 6 * TPF and cache[0]["global_end_index"].item() == 9 * TPF


def test_bfloat16_runs():
    model = tiny_model().to(torch.bfloat16)
    x, ctx = tiny_inputs()
    with torch.no_grad():
        out = model(x, torch.full((1, 3), 625.0), ctx)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert model.freqs.dtype == torch.complex128


def test_rolling_cache_attends_sink_and_most_recent_frames():
    """The reference's rolling cache, followed frame by frame (one token per frame, keys = frame index
    * 10 + call): chunk j of 3 frames attends to the frames f < E = 3 (j + 1) with f < sink or
    f >= E - (window - sink), each once, the current chunk with the keys of its latest call."""
    for local, sink in ((6, 1), (6, 3), (7, 0), (7, 2), (5, 2), (4, 0), (9, 1), (3, 0)):
        cache = {
            "k": torch.zeros(1, local, 1, 1),
            "v": torch.zeros(1, local, 1, 1),
            "global_end_index": torch.tensor([0]),
            "local_end_index": torch.tensor([0]),
        }
        for j in range(6):
            e = 3 * (j + 1)
            for call in range(5):  # 4 denoising steps + the cache fill, on the same block
                k = (torch.arange(e - 3, e, dtype=torch.float32) * 10 + call).view(1, 3, 1, 1)
                att, _ = rolling_kv_cache_update(cache, k, k, e - 3, local, sink, 1)
                keys = [int(x) for x in att.flatten()]
                frames = sorted(x // 10 for x in keys)
                assert frames == [f for f in range(e) if f < sink or f >= e - (local - sink)], (local, sink, j)
                assert all(x % 10 == (call if x // 10 >= e - 3 else 4) for x in keys), (local, sink, j, keys)


def test_huge_window_rolling_cache_equals_global_attention():
    """A window longer than the video (and one exactly as long) never rolls: the same video as global
    attention (exact: the attended keys are the same tensors in the same order)."""
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 12, TINY["in_dim"], H, W, generator=g)
    eps = {(j, k): torch.randn(1, 3, TINY["in_dim"], H, W, generator=g) for j in range(4) for k in range(3)}
    _, ctx = tiny_inputs()
    outs = []
    with torch.no_grad():
        for local, sink in ((-1, 0), (30, 1), (12, 1)):
            out = self_forcing_rollout(
                tiny_model(local_attn_size=local, sink_size=sink),
                noise,
                ctx,
                warped_denoising_steps(),
                lambda j, k: eps[(j, k)],
                local_attn_size=local,
                sink_size=sink,
            )
            outs.append(out)
        short = self_forcing_rollout(
            tiny_model(local_attn_size=6, sink_size=1),
            noise,
            ctx,
            warped_denoising_steps(),
            lambda j, k: eps[(j, k)],
            local_attn_size=6,
            sink_size=1,
        )
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    torch.testing.assert_close(outs[2], outs[0], atol=0, rtol=0)
    # and a window that rolls does change the later chunks (the first two see the same keys)
    torch.testing.assert_close(short[:, :6], outs[0][:, :6], atol=0, rtol=0)
    assert (short[:, 6:] - outs[0][:, 6:]).abs().max() > 1e-3
