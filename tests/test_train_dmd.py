"""Self-Forcing DMD: the generator's rollout is the sampler's (KV cache, cache fill), gradients flow
only through the exit step (checked on values: what the noise and earlier chunks may not influence),
the DMD gradient and losses by hand, one alternating update, and 1 vs 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from causal_dit_jax import CausalWanDiT, InferenceConfig
from causal_dit_jax.model.config import get_preset
from causal_dit_jax.model.sampler import SelfForcingSampler
from causal_dit_jax.train.config import OptimizerConfig
from causal_dit_jax.train.dmd import DMD, DMDConfig, DMDTrainer, exit_step_for, generator_rollout
from causal_dit_jax.train.trainer import train_mesh

CFG = get_preset("tiny")  # float32
INF = InferenceConfig(cache_dtype="float32")
H, W = 4, 6


@pytest.fixture(scope="module")
def models():
    dit = CausalWanDiT(CFG)
    return dit, dit.init(jax.random.key(0)), dit.init(jax.random.key(1)), dit.init(jax.random.key(2))


def _batch(seed, b=1, f=6):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "noise": jax.random.normal(k[0], (b, f, H, W, CFG.in_dim)),
        "text": jax.random.normal(k[1], (b, CFG.text_len, CFG.text_dim)),
        "negative_text": jax.random.normal(k[2], (b, CFG.text_len, CFG.text_dim)),
    }


def test_rollout_is_the_samplers_video(models):
    dit, params, _, _ = models
    batch = _batch(3)
    video = jax.jit(lambda p: generator_rollout(dit, p, batch["noise"], batch["text"], jax.random.key(4), 3, INF))(params)
    sampler = SelfForcingSampler(dit, INF)
    ref = sampler.generate(params, dit.encode_text(params, batch["text"]), batch["noise"], jax.random.key(4))
    np.testing.assert_allclose(video, ref, atol=1e-5)
    with pytest.raises(ValueError, match="exit_step must be in"):
        generator_rollout(dit, params, batch["noise"], batch["text"], jax.random.key(4), 4, INF)


def test_gradients_flow_through_the_exit_step_only(models):
    """d video / d noise: a chunk's noise enters only its first step, so it has a gradient only when
    that step is the exit (exit 0); an earlier chunk reaches a later one only through the cache fill,
    which is stop-gradient: zero. The params' gradient differs between exit steps and is finite."""
    dit, params, _, _ = models
    batch = _batch(5)

    def grad_noise(exit_step, frames):
        def f(noise):
            video = generator_rollout(dit, params, noise, batch["text"], jax.random.key(6), exit_step, INF)
            return jnp.sum(video[:, frames] ** 2)

        return jax.grad(f)(batch["noise"])

    g0 = grad_noise(0, slice(3, 6))  # the second chunk's output, exit at step 0
    assert float(jnp.abs(g0[:, :3]).max()) == 0.0  # the first chunk's noise: only via the cache fill
    assert float(jnp.abs(g0[:, 3:]).max()) > 0.0  # its own noise: through its exit step
    g2 = grad_noise(2, slice(0, 6))
    assert float(jnp.abs(g2).max()) == 0.0  # steps 0 and 1 are stop-gradient: the noise is cut off

    def grad_params(exit_step):
        return jax.grad(
            lambda p: jnp.sum(generator_rollout(dit, p, batch["noise"], batch["text"], jax.random.key(6), exit_step, INF))
        )(params)

    a, b = grad_params(0), grad_params(3)
    leaves = [(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    assert all(np.isfinite(np.asarray(x)).all() for x, _ in leaves)
    assert max(float(jnp.abs(x - y).max()) for x, y in leaves) > 1e-6


def test_dmd_gradient_and_losses_by_hand(models):
    dit, gen, teacher, critic = models
    dmd = DMD(dit, dit, dit, DMDConfig(guidance_scale=3.0), INF)
    batch = _batch(7)
    video = generator_rollout(dit, gen, batch["noise"], batch["text"], jax.random.key(8), 1, INF)
    g = dmd.dmd_gradient(teacher, critic, video, batch, jax.random.key(9))
    xt, t, sigma, _ = dmd._noised(jax.random.key(9), video)
    x0 = {
        name: dmd._x0(dit, p, xt, t, sigma, video, batch[ctx])
        for name, p, ctx in [("cond", teacher, "text"), ("uncond", teacher, "negative_text"), ("fake", critic, "text")]
    }
    real = x0["uncond"] + 3.0 * (x0["cond"] - x0["uncond"])
    by_hand = (x0["fake"] - real) / jnp.mean(jnp.abs(video - real))
    np.testing.assert_allclose(g, by_hand, rtol=1e-4, atol=1e-6)
    loss, metrics = dmd.generator_loss(gen, teacher, critic, batch, jax.random.key(10), 1)
    k_roll, k_score = jax.random.split(jax.random.key(10))
    v = generator_rollout(dit, gen, batch["noise"], batch["text"], k_roll, 1, INF)
    np.testing.assert_allclose(loss, 0.5 * jnp.mean(dmd.dmd_gradient(teacher, critic, v, batch, k_score) ** 2), rtol=1e-5)
    # the loss's gradient in the video is g / N: d/dx 0.5 mean((x - sg(x - g))^2)
    gv = jax.grad(lambda x: 0.5 * jnp.mean((x - jax.lax.stop_gradient(x - g)) ** 2))(video)
    np.testing.assert_allclose(gv * video.size, g, rtol=1e-5, atol=1e-7)
    closs, _ = dmd.critic_loss(critic, gen, batch, jax.random.key(11), 1)
    assert np.isfinite(float(closs)) and float(closs) > 0


def test_causal_scores_read_each_chunk_after_the_clean_chunks_before_it(models):
    """score_attention 'causal': a chunk's score equals the teacher's KV-cached forward of that noised
    chunk after the clean video's earlier chunks were run into the cache at t=0 (float32, 1e-5), as
    the teacher's inference reads it; the critic's flow-matching loss uses the same layout."""
    dit, gen, teacher, critic = models
    dmd = DMD(dit, dit, dit, DMDConfig(score_attention="causal"), INF)
    batch = _batch(21)
    video = generator_rollout(dit, gen, batch["noise"], batch["text"], jax.random.key(22), 2, INF)
    xt, t, sigma, eps = dmd._noised(jax.random.key(23), video)
    flow = dmd._flow(dit, teacher, xt, t, video, batch["text"])
    sampler = SelfForcingSampler(dit, INF)
    text, rope = dit.encode_text(teacher, batch["text"]), dit.rope_tables(6, H, W)
    for i in range(2):
        cache = sampler.init_cache(1, 6, H, W)
        if i:
            cache = sampler.prefill(teacher, text, video[:, :3], cache, 0, rope)
        out, _ = dit.forward(teacher, xt[:, 3 * i : 3 * i + 3], t[:, 3 * i : 3 * i + 3], text, cache, 3 * i, rope)
        np.testing.assert_allclose(flow[:, 3 * i : 3 * i + 3], out, atol=1e-5)
    # the clean context matters (not the noised chunk before): another clean chunk 0, another score
    other = dmd._flow(dit, teacher, xt, t, video.at[:, :3].multiply(-1.0), batch["text"])
    np.testing.assert_allclose(other[:, :3], flow[:, :3], atol=1e-6)
    assert float(jnp.abs(other[:, 3:] - flow[:, 3:]).max()) > 1e-3
    k_roll, k_noise = jax.random.split(jax.random.key(24))
    closs, _ = dmd.critic_loss(critic, gen, batch, jax.random.key(24), 2)
    v = generator_rollout(dit, gen, batch["noise"], batch["text"], k_roll, 2, INF)
    xt, t, _, eps = dmd._noised(k_noise, v)
    by_hand = jnp.mean((dmd._flow(dit, critic, xt, t, v, batch["text"]) - (eps - v)) ** 2)
    np.testing.assert_allclose(closs, by_hand, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown score_attention"):
        DMDConfig(score_attention="block")


def test_alternating_update_and_eight_devices(models):
    dit, gen, teacher, critic = models
    dmd = DMD(dit, dit, dit, DMDConfig(), INF)
    opt = OptimizerConfig(learning_rate=1e-4)
    batch = _batch(12, b=8)
    one = DMDTrainer(dmd, opt, opt, critic_steps=2)
    many = DMDTrainer(dmd, opt, opt, critic_steps=2, mesh=train_mesh(8))
    s1, m1 = one.step(one.init_state(gen, critic), teacher, batch)
    s8, m8 = many.step(many.init_state(gen, critic), teacher, batch)
    assert m1["exit_step"] == exit_step_for(0, 0, 4) == m8["exit_step"]
    assert int(s1["critic"]["step"]) == 2 and int(s1["generator"]["step"]) == 1
    for name in ("generator_loss", "critic_loss"):
        assert np.isfinite(float(m1[name]))
        np.testing.assert_allclose(m8[name], m1[name], rtol=1e-4)
    # the same updates on 1 and 8 devices (Adam's first step: atol lr / 10, as in test_train.py)
    for a, b in zip(jax.tree.leaves(s1["generator"]["params"]), jax.tree.leaves(s8["generator"]["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s1["generator"]["params"]), jax.tree.leaves(gen)))
    assert moved > 1e-6
