"""Self-Forcing DMD over a ('data', 'seq') mesh (`DMD(..., mesh=)`): the generator's KV-cached rollout
with each chunk's tokens over 'seq' (`SequenceRolloutModel`: Ulysses when the heads divide by seq, the
ring otherwise) and the score models' `sequence_forward` give one device's losses and gradients, the
compiled program keeping the FFN's activations split over 'seq' and gathering no per-head arrays; one
`DMDTrainer.step` equals one device's; chunks whose tokens do not split are refused when traced."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from causal_dit_jax import CausalWanDiT, InferenceConfig
from causal_dit_jax.model.config import get_preset
from causal_dit_jax.train.config import ObjectiveConfig, OptimizerConfig
from causal_dit_jax.train.dmd import DMD, DMDConfig, DMDTrainer, generator_rollout
from causal_dit_jax.train.sequence_rollout import SequenceRolloutModel
from causal_dit_jax.train.trainer import Trainer, train_mesh

CFG = get_preset("tiny")  # float32; 12 heads of 16, an FFN of 256 (no other array of the step is that wide)
N, D, FFN = CFG.num_heads, CFG.head_dim, CFG.ffn_dim
INF = InferenceConfig(cache_dtype="float32")
EXIT = 1  # the exit step of the loss comparisons (traced, as the trainer passes it)
OPT = OptimizerConfig(learning_rate=1e-4)
FAST = {"xla_backend_optimization_level": 0}  # CPU codegen without LLVM's optimisations: compiles ~2.5x faster
# 3 chunks of 3 frames of 4 x 8 latents (2 x 4 = 8 tokens a frame): a chunk is 24 tokens, the clip 72; a
# batch of 2 (1 per 'data' device): the local token counts times 1 or 2 rows never make 24 or 72.
FRAMES, H, W, B = 9, 4, 8, 2


@pytest.fixture(scope="module")
def models():
    dit = CausalWanDiT(CFG)
    return dit, dit.init(jax.random.key(0)), dit.init(jax.random.key(1)), dit.init(jax.random.key(2))


def _batch(seed: int, b: int = B, f: int = FRAMES, h: int = H, w: int = W) -> dict:
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "noise": jax.random.normal(k[0], (b, f, h, w, CFG.in_dim)),
        "text": jax.random.normal(k[1], (b, CFG.text_len, CFG.text_dim)),
        "negative_text": jax.random.normal(k[2], (b, CFG.text_len, CFG.text_dim)),
    }


def _losses_and_grads(dmd: DMD):
    """(gen, teacher, critic, batch, exit) -> (generator loss, its grads, critic loss, its grads)."""

    def fn(gen, teacher, critic, batch, exit_step):
        (g_loss, _), g_grads = jax.value_and_grad(dmd.generator_loss, has_aux=True)(
            gen, teacher, critic, batch, jax.random.key(10), exit_step
        )
        (c_loss, _), c_grads = jax.value_and_grad(dmd.critic_loss, has_aux=True)(
            critic, gen, batch, jax.random.key(11), exit_step
        )
        return g_loss, g_grads, c_loss, c_grads

    return jax.jit(fn)


@pytest.fixture(scope="module")
def one_device(models):
    """One device's (generator loss, grads, critic loss, grads) of the mesh tests' batch."""
    dit, gen, teacher, critic = models
    args = (gen, teacher, critic, _batch(3), jnp.int32(EXIT))
    return _losses_and_grads(DMD(dit, dit, dit, DMDConfig(), INF)).lower(*args).compile(FAST)(*args)


def _ffn_token_counts(hlo: str, data: int) -> set[int]:
    """The n of every [.., n, W] or [.., W, n] array, W the FFN's width or its part on a 'data' device
    (FSDP may split it): the token counts of the FFN's activations (and of its weights' other dim)."""
    widths = f"{FFN}|{FFN // data}"
    patterns = (rf"[\[,](\d+),(?:{widths})[\],]", rf"[\[,](?:{widths}),(\d+)[\],]")
    return {int(n) for pattern in patterns for n in re.findall(pattern, hlo)}


def _per_head_gathers(hlo: str, seq: int) -> list[str]:
    """The all-gathers of [.., heads, D] arrays: every head, or a device's N / seq under Ulysses."""
    heads = f"{N}|{N // seq}" if N % seq == 0 else f"{N}"
    gathers = [line for line in hlo.splitlines() if re.search(r"= .*\ball-gather(-start)?\(", line)]
    return [line for line in gathers if re.search(rf"[\[,](?:{heads}),{D}\]", line)]


@pytest.mark.parametrize(
    "seq",
    [
        4,  # 2 x 4: Ulysses (3 heads a device), params FSDP-sharded over 'data'
        pytest.param(8, marks=pytest.mark.slow),  # 1 x 8: 12 heads do not divide by 8, the ring (~1 min more)
    ],
)
def test_losses_and_gradients_equal_one_device(models, one_device, seq):
    """`generator_loss` and `critic_loss` and their gradients on a (8 / seq, seq) mesh (params FSDP over
    'data', the batch over 'data') equal one device's: losses rtol 1e-5, gradients rtol 1e-4 / atol
    1e-6 (float32 summed in another order). In the compiled program no FFN activation holds a whole
    chunk's 24 tokens or the clip's 72 (nor twice that: both rows), only a device's share, and no
    all-gather carries a per-head array (q, k, v, the cache)."""
    dit, gen, teacher, critic = models
    mesh = train_mesh(8, seq=seq)
    assert SequenceRolloutModel(dit, mesh).ulysses == (N % seq == 0)
    trainer = Trainer(None, OPT, mesh)
    placed = [jax.device_put(p, trainer.state_shardings(p)) for p in (gen, teacher, critic)]
    batch = _batch(3)
    args = (*placed, jax.device_put(batch, trainer.batch_sharding(batch)), jnp.int32(EXIT))
    compiled = _losses_and_grads(DMD(dit, dit, dit, DMDConfig(), INF, mesh=mesh)).lower(*args).compile(FAST)
    hlo = compiled.as_text()
    counts = _ffn_token_counts(hlo, 8 // seq)
    assert 24 // seq in counts, f"no FFN activation of a chunk's {24 // seq} tokens a device: {sorted(counts)}"
    whole = counts & {24, 48, 72, 144}
    assert not whole, f"FFN activations of whole sequences ({sorted(whole)} tokens) on a device"
    assert not _per_head_gathers(hlo, seq), f"per-head arrays gathered: {_per_head_gathers(hlo, seq)[:2]}"

    got = compiled(*args)
    for i in (0, 2):
        assert np.isfinite(float(one_device[i]))
        np.testing.assert_allclose(got[i], one_device[i], rtol=1e-5)
    for i in (1, 3):
        for a, b in zip(jax.tree.leaves(one_device[i]), jax.tree.leaves(got[i]), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # two compiles of the whole step (~2.5 min on 2 busy CPU cores)
def test_a_trainer_step_on_a_sequence_mesh_equals_one_device(models):
    """One `DMDTrainer.step` (2 critic updates, then the generator's) on a 4 x 2 mesh: one device's
    losses (rtol 1e-5) and updated generator (Adam's first step: atol lr / 10, as tests/test_train_dmd.py).
    The one-device step is tests/test_train_dmd.py's (batch 8 of 6 frames of 4 x 6 latents), whose
    compile a session running both files shares."""
    dit, gen, teacher, critic = models
    batch = _batch(12, b=8, f=6, h=4, w=6)  # a chunk of 18 tokens, 9 a device
    mesh = train_mesh(8, seq=2)
    one = DMDTrainer(DMD(dit, dit, dit, DMDConfig(), INF), OPT, OPT, critic_steps=2)
    many = DMDTrainer(DMD(dit, dit, dit, DMDConfig(), INF, mesh=mesh), OPT, OPT, critic_steps=2, mesh=mesh)
    s1, m1 = one.step(one.init_state(gen, critic), teacher, batch)
    s8, m8 = many.step(many.init_state(gen, critic), teacher, batch)
    assert m1["exit_step"] == m8["exit_step"]
    for name in ("generator_loss", "critic_loss"):
        assert np.isfinite(float(m1[name]))
        np.testing.assert_allclose(m8[name], m1[name], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["generator"]["params"]), jax.tree.leaves(s8["generator"]["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_chunks_whose_tokens_do_not_split_are_refused(models):
    """A chunk of 18 tokens (4 x 6 latents) on seq=4 is refused when traced, naming the sizes that
    split; a rollout on a mesh without a 'seq' axis is the one-device program; RunConfig takes 'dmd'
    with seq > 1."""
    from causal_dit_jax.train.run import RunConfig

    dit, gen, _, _ = models
    odd = _batch(7, f=6, h=4, w=6)

    def rollout(mesh):
        return lambda p, b: generator_rollout(dit, p, b["noise"], b["text"], jax.random.key(1), EXIT, INF, mesh)

    split = r"is 18 patch tokens, which do not split over the 'seq' axis of 4 devices.*\[1, 2, 3, 6, 9, 18\]"
    with pytest.raises(ValueError, match=split):
        jax.eval_shape(rollout(train_mesh(8, seq=4)), gen, odd)
    with pytest.raises(ValueError, match="needs a mesh with a 'seq' axis of 2\\+ devices"):
        SequenceRolloutModel(dit, train_mesh(8))
    assert jax.jit(rollout(train_mesh(8))).lower(gen, odd).as_text() == jax.jit(rollout(None)).lower(gen, odd).as_text()
    config = RunConfig(out_dir="x", data="y", teacher="t", objective=ObjectiveConfig(kind="dmd"), mesh=8, seq=4)
    assert (config.mesh, config.seq) == (8, 4)
