"""Sampler contract: schedule values, streaming = whole video, seeded reproducibility, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from causal_dit_jax import CausalWanDiT, InferenceConfig, SelfForcingSampler, initial_noise
from causal_dit_jax.model.config import get_preset

CFG = get_preset("tiny")


@pytest.fixture(scope="module")
def model():
    dit = CausalWanDiT(CFG)
    params = dit.init(jax.random.key(0))
    text = dit.encode_text(params, jax.random.normal(jax.random.key(1), (1, CFG.text_len, CFG.text_dim)))
    return dit, params, text


def test_warped_schedule():
    s = SelfForcingSampler(CausalWanDiT(CFG))
    np.testing.assert_allclose(s.timesteps, [1000.0, 937.5, 833.3333, 625.0], rtol=1e-6)
    np.testing.assert_allclose(s.sigmas, [1.0, 0.9375, 0.8333333, 0.625], rtol=1e-6)


def test_stream_yields_chunks_and_is_seeded(model):
    dit, params, text = model
    sampler = SelfForcingSampler(dit, InferenceConfig(cache_dtype="float32"))
    noise = initial_noise(jax.random.key(5), 1, 6, 4, 6)
    chunks = list(sampler.stream(params, text, noise, jax.random.key(6)))
    assert [c.shape for c in chunks] == [(1, 3, 4, 6, 16)] * 2
    again = sampler.generate(params, text, noise, jax.random.key(6))
    np.testing.assert_array_equal(np.concatenate(chunks, 1), again)
    other = sampler.generate(params, text, noise, jax.random.key(7))
    assert float(jnp.abs(other - again).max()) > 1e-3  # the re-noising draws depend on the key
    # RoPE tables and a KV cache made ahead (as the pipeline does before encoding the prompt); the
    # cache is consumed, and a used one (its slots full of an earlier video) gives the same video
    rope = dit.rope_tables(6, 4, 6)
    used = sampler.init_cache(1, 6, 4, 6)
    used = used.replace(k=used.k + 3.0, v=used.v - 2.0)
    ahead = list(sampler.stream(params, text, noise, jax.random.key(6), rope=rope, cache=used))
    np.testing.assert_array_equal(np.concatenate(ahead, 1), again)
    with pytest.raises(ValueError, match="the given KV cache"):
        next(sampler.stream(params, text, noise, jax.random.key(6), cache=sampler.init_cache(1, 9, 4, 6)))
    # same shape, another window: a cache made for a different eviction is refused too
    windowed = SelfForcingSampler(dit, InferenceConfig(cache_dtype="float32", local_attn_size=5, sink_size=1))
    with pytest.raises(ValueError, match="does not fit this stream"):
        next(windowed.stream(params, text, noise, jax.random.key(6), cache=sampler.init_cache(1, 6, 4, 6)))


def test_last_chunk_cache_fill_is_skipped_unless_asked(model):
    # the last chunk's fill writes keys no chunk reads: skipped by default (3 chunks -> 2 fills), run
    # with fill_last_chunk=True (the 5-forwards-per-chunk count of Self-Forcing's loop); same latents
    dit, params, text = model
    sampler = SelfForcingSampler(dit, InferenceConfig(cache_dtype="float32"))
    fills = []
    fill_fn = sampler._fill_fn
    sampler._fill_fn = lambda *a: fills.append(1) or fill_fn(*a)
    noise = initial_noise(jax.random.key(5), 1, 9, 4, 6)
    short = np.concatenate(list(sampler.stream(params, text, noise, jax.random.key(6))), 1)
    assert len(fills) == 2
    fills.clear()
    full = np.concatenate(list(sampler.stream(params, text, noise, jax.random.key(6), fill_last_chunk=True)), 1)
    assert len(fills) == 3
    np.testing.assert_array_equal(short, full)


def test_bad_inputs(model):
    dit, params, text = model
    sampler = SelfForcingSampler(dit)
    with pytest.raises(ValueError, match="do not fit chunks of 3"):
        next(sampler.stream(params, text, jnp.zeros((1, 4, 4, 6, 16)), jax.random.key(0)))
    with pytest.raises(ValueError, match="channels"):
        next(sampler.stream(params, text, jnp.zeros((1, 3, 4, 6, 8)), jax.random.key(0)))
    with pytest.raises(ValueError, match="multiples of 16"):
        next(sampler.stream(params, text, jnp.zeros((1, 3, 5, 6, 16)), jax.random.key(0)))
    with pytest.raises(ValueError, match=r"text context must be \[batch, tokens, 32\]"):
        dit.encode_text(params, jnp.zeros((1, 8, 64)))
    with pytest.raises(ValueError, match="text batch"):
        next(sampler.stream(params, text, jnp.zeros((2, 3, 4, 6, 16)), jax.random.key(0)))


def test_given_step_noise_reproduces_a_pytorch_run(tmp_path):
    """Every draw from PyTorch: the initial noise and each re-noising eps come from torch.randn in
    Self-Forcing's [B, F, C, H, W] layout (a 7-D [chunks, steps - 1, B, c, C, H, W] stack for the
    re-noising), our sampler takes them as given (no key) and lands on the reference rollout's latents.
    float32 on both sides: 1e-4 relative L2, as tests/test_dit_parity.py."""
    import torch
    from dit_fixtures import LATENT_H, LATENT_W, SMALL, rel_err, save_self_forcing_pt, torch_model
    from torch_reference.causal_wan import self_forcing_rollout, warped_denoising_steps

    from causal_dit_jax.convert import load_dit_params
    from causal_dit_jax.model.patchify import from_torch_layout

    model = torch_model(seed=4)
    _, params = load_dit_params(save_self_forcing_pt(model, tmp_path / "sf.pt"), SMALL)
    g = torch.Generator().manual_seed(0)
    chunks, steps = 2, 4
    noise = torch.randn(1, 3 * chunks, SMALL.in_dim, LATENT_H, LATENT_W, generator=g)
    eps = torch.randn(chunks, steps - 1, 1, 3, SMALL.in_dim, LATENT_H, LATENT_W, generator=g)
    ctx = torch.randn(1, SMALL.text_len, SMALL.text_dim, generator=g)
    with torch.no_grad():
        ref = self_forcing_rollout(model, noise, ctx, warped_denoising_steps(), lambda j, k: eps[j, k])

    dit = CausalWanDiT(SMALL)
    sampler = SelfForcingSampler(dit, InferenceConfig(cache_dtype="float32"))
    text = dit.encode_text(params, jnp.asarray(ctx.numpy()))
    ours = sampler.generate(params, text, from_torch_layout(noise.numpy()), None, step_noise=from_torch_layout(eps.numpy()))
    assert rel_err(ours, from_torch_layout(ref.numpy())) <= 1e-4
    with pytest.raises(ValueError, match=r"step_noise must be \[chunks, steps - 1, B, c, H, W, C\]"):
        sampler.generate(params, text, from_torch_layout(noise.numpy()), None, step_noise=from_torch_layout(eps[:1].numpy()))
    with pytest.raises(ValueError, match="give a key"):
        sampler.generate(params, text, from_torch_layout(noise.numpy()), None)


def test_context_and_video_to_video_match_pytorch(tmp_path):
    """Video conditioning against the PyTorch reference loop, float32 on both sides, 1e-4 relative L2:
    (a) context latents (Self-Forcing's initial_latent path: each context chunk run once at t=0 into the
    cache, the noise chunks generated after it, the global time index continuing past the context);
    (b) video-to-video from step 2: the reference loop over the schedule's last two steps, started from
    the same noised latents, with the same re-noising draws (our row 2 is its row 0)."""
    import torch
    from dit_fixtures import LATENT_H, LATENT_W, SMALL, rel_err, save_self_forcing_pt, torch_model
    from torch_reference.causal_wan import self_forcing_rollout, warped_denoising_steps

    from causal_dit_jax.convert import load_dit_params
    from causal_dit_jax.model.patchify import from_torch_layout

    model = torch_model(seed=5)
    _, params = load_dit_params(save_self_forcing_pt(model, tmp_path / "sf.pt"), SMALL)
    g = torch.Generator().manual_seed(1)
    shape = (SMALL.in_dim, LATENT_H, LATENT_W)
    initial = torch.randn(1, 3, *shape, generator=g)
    noise = torch.randn(1, 6, *shape, generator=g)
    eps = torch.randn(2, 3, 1, 3, *shape, generator=g)
    ctx = torch.randn(1, SMALL.text_len, SMALL.text_dim, generator=g)
    steps = warped_denoising_steps()
    with torch.no_grad():
        ref = self_forcing_rollout(model, noise, ctx, steps, lambda j, k: eps[j, k], initial_latent=initial, start_frame=3)
        ref_v2v = self_forcing_rollout(model, noise, ctx, steps[2:], lambda j, k: eps[j, k + 2])

    dit = CausalWanDiT(SMALL)
    sampler = SelfForcingSampler(dit, InferenceConfig(cache_dtype="float32"))
    text = dit.encode_text(params, jnp.asarray(ctx.numpy()))
    run = dict(step_noise=from_torch_layout(eps.numpy()))
    context = from_torch_layout(initial.numpy())
    ours = sampler.generate(params, text, from_torch_layout(noise.numpy()), None, 3, context=context, **run)
    assert ours.shape == (1, 6, LATENT_H, LATENT_W, 16)  # the generated chunks only
    err = rel_err(ours, from_torch_layout(ref[:, 3:].numpy()))
    print(f"context path vs PyTorch: rel L2 {err:.2e}")
    assert err <= 1e-4
    # a context changes what follows it
    plain = sampler.generate(params, text, from_torch_layout(noise.numpy()), None, **run)
    assert rel_err(plain, ours) > 1e-2
    v2v = sampler.generate(params, text, from_torch_layout(noise.numpy()), None, first_step=2, **run)
    err = rel_err(v2v, from_torch_layout(ref_v2v.numpy()))
    print(f"video-to-video from step 2 vs PyTorch: rel L2 {err:.2e}")
    assert err <= 1e-4


def test_prefill_writes_the_cache_of_a_t0_forward_and_strength_steps(model):
    dit, params, text = model
    sampler = SelfForcingSampler(dit, InferenceConfig(cache_dtype="float32"))
    z = jax.random.normal(jax.random.key(3), (1, 6, 4, 6, 16))
    rope = dit.rope_tables(9, 4, 6)
    cache = sampler.prefill(params, text, z, sampler.init_cache(1, 9, 4, 6), 0, rope)
    # by hand: one forward per chunk at t=0 into a fresh cache
    by_hand = sampler.init_cache(1, 9, 4, 6)
    for j in range(2):
        _, by_hand = dit.forward(params, z[:, 3 * j : 3 * j + 3], jnp.zeros((1, 3)), text, by_hand, jnp.int32(3 * j), rope)
    np.testing.assert_allclose(cache.k, by_hand.k, atol=1e-6)
    np.testing.assert_allclose(cache.v, by_hand.v, atol=1e-6)
    assert float(jnp.abs(cache.k[:, :, : 2 * 3 * 6]).max()) > 0 and float(jnp.abs(cache.k[:, :, 2 * 3 * 6 :]).max()) == 0
    # strength -> the first step: int(s * 4) steps run
    assert [sampler.first_step_for_strength(s) for s in (1.0, 0.75, 0.5, 0.3, 0.25)] == [0, 1, 2, 3, 3]
    for bad in (0.0, 0.2, 1.5, -1.0):
        with pytest.raises(ValueError, match="strength must be in"):
            sampler.first_step_for_strength(bad)
    x = sampler.noise_to_step(z, jnp.ones_like(z), 2)
    np.testing.assert_allclose(x, (1 - sampler.sigmas[2]) * z + sampler.sigmas[2], rtol=1e-6)
    # strength 1 is text-to-video: sigma_0 = 1, the noised video is the noise itself
    noise = initial_noise(jax.random.key(5), 1, 3, 4, 6)
    np.testing.assert_array_equal(sampler.noise_to_step(z[:, :3], noise, 0), noise)
    with pytest.raises(ValueError, match="context must be clean latents"):
        next(sampler.stream(params, text, noise, jax.random.key(0), context=z[:, :2]))
    with pytest.raises(ValueError, match="first_step must be in"):
        next(sampler.stream(params, text, noise, jax.random.key(0), first_step=4))
