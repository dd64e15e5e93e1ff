"""Training over a ('data', 'seq') mesh: Ulysses attention (`sharding.train_attention`) gives one
device's teacher-forcing and diffusion-forcing loss and gradients on 2 x 4 and 1 x 8 meshes with
FSDP-sharded params, exchanges q/k/v by all-to-all (no all-gathered keys or values in the compiled
step), refuses splits that do not divide (heads that do not divide take ring attention instead:
tests/test_train_ring_attention.py), and drives `train(RunConfig(mesh=8, seq=4))`."""

import json
import re

import jax
import numpy as np
import pytest

from causal_dit_jax import CausalWanDiT
from causal_dit_jax.model.config import get_preset
from causal_dit_jax.sharding.train_attention import check_sequence_split, ulysses_sequence_attention
from causal_dit_jax.train.block_attention import make_block_attention, teacher_forcing_plan
from causal_dit_jax.train.config import ObjectiveConfig, OptimizerConfig
from causal_dit_jax.train.objectives import FlowObjective
from causal_dit_jax.train.trainer import Trainer, train_mesh

# 8 heads (split over 4 or 8 devices) of head_dim 20, a size no other array of the step has: a
# gathered K/V tensor would show up in the HLO as an all-gather with a dimension of 20.
CFG = get_preset("tiny").replace(param_dtype="float32", dtype="float32", dim=160, num_heads=8)
D = CFG.head_dim
H, W = 4, 8  # latent grid: 2 x 4 = 8 tokens per frame; 6 frames: 48 tokens (96 with teacher forcing)


@pytest.fixture(scope="module")
def model():
    dit = CausalWanDiT(CFG)
    return dit, dit.init(jax.random.key(0))


@pytest.fixture(scope="module")
def one_device(model):
    """kind -> one device's (loss, grads) of the batch the mesh tests use (computed once per kind)."""
    dit, params = model
    done = {}

    def get(kind):
        if kind not in done:
            one = Trainer(FlowObjective(dit, ObjectiveConfig(kind=kind)), OptimizerConfig(learning_rate=1e-4))
            loss, _, grads = jax.jit(one.loss_and_grads)(params, _batch(9), jax.random.key(4))
            done[kind] = loss, grads
        return done[kind]

    return get


def _batch(seed: int, b: int = 2, h: int = H, w: int = W):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "latents": jax.random.normal(k1, (b, 6, h, w, CFG.in_dim)),
        "text": jax.random.normal(k2, (b, CFG.text_len, CFG.text_dim)),
    }


def _collectives(hlo: str, op: str) -> list[str]:
    return [line for line in hlo.splitlines() if re.search(rf"= .*\b{op}(-start)?\(", line)]


@pytest.mark.parametrize("kind, seq", [("teacher_forcing", 4), ("diffusion_forcing", 8)])  # both masks, both meshes
def test_ulysses_training_equals_one_device(model, one_device, kind, seq):
    """Loss (rtol 1e-5) and gradients (rtol 1e-4, atol 1e-6: float32 summed in another order) of a
    (data, seq) = (8 / seq, seq) mesh equal one device's; in the compiled step q/k/v cross devices
    only by all-to-all ([B, L/seq, N/seq, D] pieces), and no all-gather carries a per-head tensor."""
    dit, params = model
    batch = _batch(9)
    objective = ObjectiveConfig(kind=kind)
    loss1, g1 = one_device(kind)

    mesh = train_mesh(8, seq=seq)
    assert dict(mesh.shape) == {"data": 8 // seq, "seq": seq}
    many = Trainer(FlowObjective(dit, objective, mesh=mesh), OptimizerConfig(learning_rate=1e-4), mesh=mesh)
    state = many.init_state(params)
    sharded = any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state["params"]))
    assert sharded == (seq < 8), "FSDP shards the weights over 'data' (of size 1 on the 1 x 8 mesh)"
    placed = jax.device_put(batch, many.batch_sharding(batch))
    step = jax.jit(many.loss_and_grads)
    hlo = step.lower(state["params"], placed, jax.random.key(4)).compile().as_text()
    frames = 12 if kind == "teacher_forcing" else 6
    local, heads = frames * 8 // seq, CFG.num_heads // seq
    piece = re.compile(rf"\[{2 * seq // 8},{local},{heads},{D}\]")  # b (l/s) (n/s) d: a piece of q/k/v or the output
    assert any(piece.search(line) for line in _collectives(hlo, "all-to-all")), "q/k/v go to heads by all-to-all"
    per_head = [line for line in _collectives(hlo, "all-gather") if re.search(rf"\[[\d,]*\b{D}\b[\d,]*\]", line)]
    assert not per_head, f"keys/values gathered: {per_head[:2]}"

    loss8, _, g8 = step(state["params"], placed, jax.random.key(4))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_ulysses_attention_equals_the_plan_and_refuses_bad_splits(model):
    """The wrapped plan equals the plain one (float32, 1e-6) outside any train step; heads (for Ulysses
    asked for by name; 'auto' takes the ring), tokens and batch that do not split are refused before
    any work, with the sizes that would."""
    plan = teacher_forcing_plan(6, 3)
    mesh = train_mesh(8, seq=4)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 12 * 8, 8, D)) for i in range(3))
    want, _ = make_block_attention(plan, 8)(q, k, v)
    got, _ = jax.jit(make_block_attention(plan, 8, mesh=mesh))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-6)
    plain = make_block_attention(plan, 8)
    assert ulysses_sequence_attention(plain, train_mesh(8)) is plain  # no 'seq' axis: the attention as it is

    dit, params = model
    with pytest.raises(ValueError, match=r"needs the 8 heads divisible by 3; 'seq' sizes that divide them: \[1, 2, 4, 8\]"):
        check_sequence_split(jax.make_mesh((2, 3), ("data", "seq"), devices=jax.devices()[:6]), 8)
    FlowObjective(CausalWanDiT(get_preset("tiny")), mesh=train_mesh(8, seq=8))  # 12 heads over 8: ring attention
    twelve = jax.ShapeDtypeStruct((8, 12 * 8, 12, D), np.float32)
    ulysses = make_block_attention(plan, 8, mesh=train_mesh(8, seq=8), sequence_attention="ulysses")
    with pytest.raises(ValueError, match="needs the 12 heads divisible by 8"):
        jax.eval_shape(ulysses, twelve, twelve, twelve)
    with pytest.raises(ValueError, match="unknown sequence_attention 'tree'"):
        make_block_attention(plan, 8, mesh=mesh, sequence_attention="tree")
    objective = FlowObjective(dit, ObjectiveConfig(kind="diffusion_forcing"), mesh=train_mesh(8, seq=8))
    odd = _batch(1, h=4, w=6)  # 6 frames of 6 tokens: 36 tokens over 8 devices
    with pytest.raises(ValueError, match=r"36 tokens do not split over the 'seq' axis of 8 devices.*\[1, 2, 3, 4, 6, 9"):
        jax.eval_shape(objective, params, odd, jax.random.key(0))
    objective = FlowObjective(dit, mesh=train_mesh(8, seq=4))  # data = 2
    with pytest.raises(ValueError, match="batch 1 does not split over the 'data' axis of 2 devices"):
        jax.eval_shape(objective, params, _batch(1, b=1), jax.random.key(0))
    with pytest.raises(ValueError, match="seq=3 does not divide 8 devices"):
        train_mesh(8, seq=3)


@pytest.mark.slow
def test_a_run_with_a_sequence_axis_matches_one_device(tmp_path):
    """`train(RunConfig(mesh=8, seq=4))` (the tiny preset's 12 heads over 4 devices) logs one device's
    losses (rtol 1e-5) for 2 steps."""
    from causal_dit_jax.train.data import write_latent_text_example
    from causal_dit_jax.train.run import RunConfig, train

    tiny = get_preset("tiny")
    rng = np.random.default_rng(0)
    for i in range(4):
        latents = rng.standard_normal((6, H, W, tiny.in_dim)).astype(np.float32)
        text = rng.standard_normal((tiny.text_len, tiny.text_dim)).astype(np.float32)
        write_latent_text_example(tmp_path / "data", i, latents, text)

    def losses(name, **kw):
        cfg = dict(out_dir=str(tmp_path / name), data=str(tmp_path / "data"), steps=2, log_every=1, save_every=2, **kw)
        train(RunConfig.from_dict(cfg), progress=False)
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    np.testing.assert_allclose(losses("seq", mesh=8, seq=4), losses("one"), rtol=1e-5)
