"""Ring attention for training (`sharding.train_attention.ring_sequence_attention`), the 'seq' path for
heads that do not divide by the 'seq' size: the plan's dense attention (values and gradients) for every
mask on 2, 4 and 8 ring members, and one device's teacher-forcing loss and gradients on a 2 x 4 mesh
with 5 heads, K/V moving by collective-permute only."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from causal_dit_jax import CausalWanDiT
from causal_dit_jax.model.config import get_preset
from causal_dit_jax.sharding.train_attention import member_visibility, ring_sequence_attention
from causal_dit_jax.train.block_attention import (
    bidirectional_plan,
    block_causal_plan,
    make_block_attention,
    teacher_forcing_plan,
)
from causal_dit_jax.train.config import ObjectiveConfig, OptimizerConfig
from causal_dit_jax.train.objectives import FlowObjective
from causal_dit_jax.train.trainer import Trainer, train_mesh

# Every plan covers 6 frames of 4 tokens: 24 tokens, so the members' token ranges (12, 6 or 3 tokens)
# cut through frames on 4 and 8 members, and the token-level mask is exercised across frame edges.
T = 4
PLANS = {
    "teacher_forcing": teacher_forcing_plan(3, 1),  # [clean 3 | noisy 3]
    "block_causal": block_causal_plan(6, 2),
    "bidirectional": bidirectional_plan(6),
}

# 5 heads (no 'seq' size of 2, 4 or 8 divides them) of head_dim 22, a size no other array of the step
# has: a gathered K/V tensor would show up in the HLO as an all-gather with a dimension of 22.
CFG = get_preset("tiny").replace(param_dtype="float32", dtype="float32", dim=110, num_heads=5, num_layers=1)
D = CFG.head_dim
H, W = 4, 8  # latent grid: 2 x 4 = 8 tokens per frame; 6 frames, 12 with teacher forcing: 96 tokens


def _collectives(hlo: str, op: str) -> list[str]:
    return [line for line in hlo.splitlines() if re.search(rf"= .*\b{op}(-start)?\(", line)]


def _inputs(length: int):
    """q, k, v and the output's projection [4, length, 3, 8]: 3 heads, the batch splits over any 'data' size."""
    return [jax.random.normal(jax.random.key(i), (4, length, 3, 8)) for i in range(4)]


def _value_and_grads(attention, proj):
    """(q, k, v) -> ((sum(out * proj), out), d/d(q, k, v))."""

    def loss(q, k, v):
        out, _ = attention(q, k, v)
        return jnp.sum(out * proj), out

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@functools.cache
def _dense(name: str):
    """The plan's dense attention on one device: (out, grads), computed once per plan."""
    plan = PLANS[name]
    q, k, v, proj = _inputs(plan.num_frames * T)
    (_, out), grads = jax.jit(_value_and_grads(make_block_attention(plan, T, "xla"), proj))(q, k, v)
    return out, grads


@pytest.mark.parametrize("seq", [2, 4, 8])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_ring_attention_equals_the_dense_plan(name, seq):
    """3 heads over a (8 / seq, seq) mesh: 'auto' runs the ring (collective-permute, no all-to-all) and
    its output and gradients w.r.t. q, k, v (of a random projection of the output) equal the dense
    plan's on one device (float32, atol 1e-5: the softmax summed in another order)."""
    plan = PLANS[name]
    q, k, v, proj = _inputs(plan.num_frames * T)
    want, want_grads = _dense(name)
    ring = jax.jit(_value_and_grads(make_block_attention(plan, T, mesh=train_mesh(8, seq=seq)), proj))
    compiled = ring.lower(q, k, v).compile()
    hlo = compiled.as_text()
    assert _collectives(hlo, "collective-permute"), "the K/V blocks travel around the ring"
    assert not _collectives(hlo, "all-to-all"), "3 heads do not split over 'seq': no Ulysses exchange"
    (_, got), grads = compiled(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_ring_skips_only_invisible_hops_and_refuses_bad_inputs():
    """The hop table marks exactly the member pairs that share a visible token pair (the others are
    skipped); a frame that attends nothing, tokens or a batch that do not split, and q/k/v of another
    length than the mask's are refused."""
    plan = PLANS["block_causal"]
    table = member_visibility(plan.frame_mask(), T, 4, 6)  # 4 members of 6 tokens (1.5 frames each)
    tokens = np.kron(plan.frame_mask(), np.ones((T, T), bool))  # [24, 24]: query token i sees key token j
    np.testing.assert_array_equal(table, tokens.reshape(4, 6, 4, 6).any(axis=(1, 3)))
    assert not table.all(), "block-causal: some hops are skipped"
    with pytest.raises(ValueError, match=r"query frames \[1\] attend no key frame"):
        ring_sequence_attention(np.array([[True, False], [False, False]]), T, train_mesh(8, seq=4))
    ring = ring_sequence_attention(plan.frame_mask(), 3, train_mesh(8, seq=4))  # 6 frames of 3: 18 tokens
    x = jax.ShapeDtypeStruct((2, 18, 3, 8), np.float32)
    with pytest.raises(ValueError, match=r"18 tokens do not split over the 'seq' axis of 4 devices"):
        jax.eval_shape(ring, x, x, x)
    x = jax.ShapeDtypeStruct((1, 24, 3, 8), np.float32)
    with pytest.raises(ValueError, match="batch 1 does not split over the 'data' axis of 2 devices"):
        jax.eval_shape(ring_sequence_attention(plan.frame_mask(), T, train_mesh(8, seq=4)), x, x, x)
    with pytest.raises(ValueError, match="of 20/20/20 tokens; the mask's sequence has 24"):
        y = jax.ShapeDtypeStruct((2, 20, 3, 8), np.float32)
        jax.eval_shape(ring_sequence_attention(plan.frame_mask(), T, None), y, y, y)


def test_five_heads_train_on_a_sequence_axis_as_on_one_device():
    """Teacher forcing with 5 heads: a 2 x 4 ('data', 'seq') mesh gives one device's loss (rtol 1e-5) and
    gradients (rtol 1e-4, atol 1e-6: float32 summed in another order); in the compiled step the K/V
    blocks [B/data, L/seq, N, D] move by collective-permute and no all-gather carries a per-head tensor."""
    dit = CausalWanDiT(CFG)
    params = dit.init(jax.random.key(0))
    k1, k2 = jax.random.split(jax.random.key(9))
    batch = {
        "latents": jax.random.normal(k1, (2, 6, H, W, CFG.in_dim)),
        "text": jax.random.normal(k2, (2, CFG.text_len, CFG.text_dim)),
    }
    objective = ObjectiveConfig(kind="teacher_forcing")
    one = Trainer(FlowObjective(dit, objective), OptimizerConfig(learning_rate=1e-4))
    loss1, _, g1 = jax.jit(one.loss_and_grads)(params, batch, jax.random.key(4))

    mesh = train_mesh(8, seq=4)
    many = Trainer(FlowObjective(dit, objective, mesh=mesh), OptimizerConfig(learning_rate=1e-4), mesh=mesh)
    state = many.init_state(params)
    placed = jax.device_put(batch, many.batch_sharding(batch))
    compiled = jax.jit(many.loss_and_grads).lower(state["params"], placed, jax.random.key(4)).compile()
    hlo = compiled.as_text()
    block = re.compile(rf"\[1,{12 * 8 // 4},{CFG.num_heads},{D}\]")  # b (l/s) n d: a K or V block
    assert any(block.search(line) for line in _collectives(hlo, "collective-permute")), "K/V travel the ring"
    per_head = [line for line in _collectives(hlo, "all-gather") if re.search(rf"\[[\d,]*\b{D}\b[\d,]*\]", line)]
    assert not per_head, f"keys/values gathered: {per_head[:2]}"

    loss8, _, g8 = compiled(state["params"], placed, jax.random.key(4))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
