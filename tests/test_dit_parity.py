"""Numerical parity of the Flax DiT and sampler with the PyTorch reference, via the real converter.

Tolerances: float32 paths must agree to relative error <= 1e-4 (||a-b||/||b||); both sides run
the same math in float32, so the remaining difference is summation order and the float32 (ours) vs
float64 (PyTorch) sinusoid/RoPE angle math. bf16 bounds are stated at each test.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dit_fixtures import LATENT_H, LATENT_W, SMALL, rel_err, save_safetensors, save_self_forcing_pt, torch_model
from torch_reference.causal_wan import self_forcing_rollout, warped_denoising_steps

from causal_dit_jax import CausalWanDiT, InferenceConfig, SelfForcingSampler
from causal_dit_jax.convert import load_dit_params
from causal_dit_jax.model.patchify import from_torch_layout, to_torch_layout
from causal_dit_jax.model.sampler import draw_step_noise

F32_TOL = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    model = torch_model()
    _, params = load_dit_params(save_self_forcing_pt(model, tmp / "sf.pt"), SMALL)
    return model, params


def _inputs(seed, frames=3, batch=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, SMALL.in_dim, frames, LATENT_H, LATENT_W, generator=g)
    ctx = torch.randn(batch, SMALL.text_len, SMALL.text_dim, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000
    return x, t, ctx


@pytest.mark.parametrize("start_frame", [0, 7])
def test_chunk_forward_without_cache(converted, start_frame):
    model, params = converted
    x, t, ctx = _inputs(seed=10 + start_frame, batch=2)
    tpf = (LATENT_H // 2) * (LATENT_W // 2)
    with torch.no_grad():
        ref = model(x, t, ctx, current_start=start_frame * tpf)
    dit = CausalWanDiT(SMALL)
    rope = dit.rope_tables(start_frame + 3, LATENT_H, LATENT_W)
    out, _ = jax.jit(dit.forward)(
        params,
        from_torch_layout(x.numpy(), "bcfhw"),
        jnp.asarray(t.numpy()),
        dit.encode_text(params, jnp.asarray(ctx.numpy())),
        None,
        start_frame,
        rope,
    )
    assert rel_err(to_torch_layout(out, "bcfhw"), ref.numpy()) <= F32_TOL


def _rollout_pair(converted, frames, start_frame, local_attn_size=-1, sink_size=0, seed=0):
    model, params = converted
    model.local_attn_size, model.sink_size = local_attn_size, sink_size
    for blk in model.blocks:
        blk.self_attn.local_attn_size, blk.self_attn.sink_size = local_attn_size, sink_size
    inference = InferenceConfig(local_attn_size=local_attn_size, sink_size=sink_size, cache_dtype="float32")
    dit = CausalWanDiT(SMALL)
    sampler = SelfForcingSampler(dit, inference)
    key = jax.random.key(seed)
    noise = jax.random.normal(jax.random.fold_in(key, 99), (1, frames, LATENT_H, LATENT_W, SMALL.in_dim))
    ctx = jax.random.normal(jax.random.fold_in(key, 98), (1, SMALL.text_len, SMALL.text_dim))
    ours = sampler.generate(params, dit.encode_text(params, ctx), noise, key, start_frame=start_frame)

    n = len(sampler.timesteps)
    shape = (1, 3, LATENT_H, LATENT_W, SMALL.in_dim)

    def noise_fn(j, k):
        return torch.from_numpy(np.asarray(to_torch_layout(draw_step_noise(key, j, shape, n)[k], "bfchw")))

    with torch.no_grad():
        ref = self_forcing_rollout(
            model,
            torch.from_numpy(np.asarray(to_torch_layout(noise, "bfchw"))),
            torch.from_numpy(np.asarray(ctx)),
            warped_denoising_steps(),
            noise_fn,
            local_attn_size=local_attn_size,
            sink_size=sink_size,
            start_frame=start_frame,
        )
    return np.asarray(to_torch_layout(ours, "bfchw")), ref.numpy()


@pytest.mark.parametrize("start_frame", [0, 5])
def test_rollout_with_cache_matches_reference(converted, start_frame):
    """4 chunks, 4 denoising steps + cache fill each: 20 forwards through the KV cache."""
    ours, ref = _rollout_pair(converted, frames=12, start_frame=start_frame, seed=start_frame)
    for j in range(4):
        assert rel_err(ours[:, 3 * j : 3 * j + 3], ref[:, 3 * j : 3 * j + 3]) <= F32_TOL, f"chunk {j}"


def test_rollout_local_window_with_sink(converted):
    """Window of 9 frames with a 3-frame sink over 6 chunks: the cache rolls 3 times."""
    ours, ref = _rollout_pair(converted, frames=18, start_frame=2, local_attn_size=9, sink_size=3, seed=3)
    assert rel_err(ours, ref) <= F32_TOL
    # and the window matters: global attention gives a different video
    ours_global, _ = _rollout_pair(converted, frames=18, start_frame=2, seed=3)
    assert rel_err(ours_global[:, 12:], ours[:, 12:]) > 1e-3


def test_safetensors_and_pt_convert_identically(tmp_path):
    model = torch_model(seed=5)
    _, a = load_dit_params(save_self_forcing_pt(model, tmp_path / "m.pt"), SMALL)
    (tmp_path / "config.json").write_text(
        json.dumps(  # Wan's HF config beside the weights
            {"dim": 192, "num_heads": 12, "num_layers": 2, "ffn_dim": 256, "text_len": 8, "model_type": "t2v"}
        )
    )
    cfg, b = load_dit_params(save_safetensors(model, tmp_path / "m.safetensors"))  # config inferred
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.ffn_dim, cfg.text_len) == (192, 2, 12, 256, 8)
    assert jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.array_equal(u.astype(v.dtype), v)), a, b))


def test_bf16_close_to_float32_reference(tmp_path):
    """bf16 weights and matmuls against the float32 PyTorch model.

    Bound: our bf16 error may be at most 1.5x PyTorch's own bf16-vs-float32 error on the same weights
    and inputs (both are dominated by bf16's 8-bit mantissa, ~0.4% per rounding) and below 2%.
    Measured here: ours ~0.5% (float32 residual) / ~0.6% (all-bf16), PyTorch bf16 ~0.6%.
    """
    model = torch_model(seed=2)
    path = save_self_forcing_pt(model, tmp_path / "m.pt")
    x, t, ctx = _inputs(seed=4)
    with torch.no_grad():
        ref = model(x, t, ctx).numpy()
        torch_bf16 = model.to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16()).float().numpy()
    torch_err = rel_err(torch_bf16, ref)
    for residual in ("float32", "bfloat16"):
        cfg = SMALL.replace(param_dtype="bfloat16", dtype="bfloat16", residual_dtype=residual)
        _, params = load_dit_params(path, cfg)
        assert params["blocks"]["self_attn"]["qkv"]["kernel"].dtype == jnp.bfloat16
        dit = CausalWanDiT(cfg)
        out, _ = dit.forward(
            params,
            from_torch_layout(x.numpy(), "bcfhw"),
            jnp.asarray(t.numpy()),
            dit.encode_text(params, jnp.asarray(ctx.numpy())),
            None,
            0,
            dit.rope_tables(3, LATENT_H, LATENT_W),
        )
        err = rel_err(to_torch_layout(out, "bcfhw"), ref)
        assert err <= min(1.5 * torch_err, 2e-2), (residual, err, torch_err)


def test_per_layer_weights_equal_stacked_weights():
    """unstack_blocks (one buffer per layer's weight, a Python layer loop) runs the same model as the
    stacked scan: over a cache, the same flow (float32, 1e-5: XLA fuses the unrolled layers
    differently; measured 2e-6) and the same bf16 cache (1e-3: a few elements round to the neighbouring
    bf16 value; measured 5e-5); the number of blocks is checked and unstacking again is a no-op."""
    from dit_fixtures import two_chunk_forwards

    from causal_dit_jax.model.dit import unstack_blocks

    dit = CausalWanDiT(SMALL)
    stacked, cache_s = two_chunk_forwards(dit, LATENT_H, LATENT_W)
    per_layer, cache_p = two_chunk_forwards(dit, LATENT_H, LATENT_W, prepare=unstack_blocks)
    assert rel_err(per_layer, stacked) <= 1e-5
    assert rel_err(cache_p.k, cache_s.k) <= 1e-3 and rel_err(cache_p.v, cache_s.v) <= 1e-3
    params = unstack_blocks(dit.init(jax.random.key(0)))
    assert len(params["blocks"]) == SMALL.num_layers and unstack_blocks(params) is params
    with pytest.raises(ValueError, match=f"params hold {SMALL.num_layers - 1} blocks, the model {SMALL.num_layers}"):
        dit.forward(
            {**params, "blocks": params["blocks"][:-1]},
            jnp.zeros((1, 3, LATENT_H, LATENT_W, SMALL.in_dim)),
            jnp.zeros((1, 3)),
            dit.encode_text(params, jnp.zeros((1, SMALL.text_len, SMALL.text_dim))),
            None,
            0,
            dit.rope_tables(3, LATENT_H, LATENT_W),
        )
