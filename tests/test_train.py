"""Training: the attention plans against Self-Forcing's mask predicates, teacher forcing against the
KV-cached inference forward, 1 vs 8 devices (FSDP over the data axis), accumulation, EMA, the schedule,
and a tiny model's loss falling on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from causal_dit_jax import CausalWanDiT
from causal_dit_jax.model.config import get_preset
from causal_dit_jax.train.block_attention import (
    attended_pairs,
    bidirectional_plan,
    block_causal_plan,
    make_block_attention,
    teacher_forcing_plan,
)
from causal_dit_jax.train.config import ObjectiveConfig, OptimizerConfig
from causal_dit_jax.train.objectives import FlowObjective, bell_weights, sequence_forward
from causal_dit_jax.train.trainer import Trainer, fsdp_spec, learning_rate_schedule, train_mesh

CFG = get_preset("tiny").replace(param_dtype="float32", dtype="float32")  # float32: exact comparisons
H, W = 4, 6  # latent grid: 2 x 3 tokens per frame


def _self_forcing_teacher_forcing_mask(num_frames: int, frame_seqlen: int, block: int) -> np.ndarray:
    """Self-Forcing's `_prepare_teacher_forcing_mask` predicate, token level: the sequence is
    [clean | noisy]; clean token q sees kv < the end of its block; a noisy token sees the clean tokens
    before its block's start and the noisy tokens of its block; every token sees itself."""
    total = num_frames * frame_seqlen
    block_len = block * frame_seqlen
    q = np.arange(2 * total)[:, None]
    kv = np.arange(2 * total)[None, :]
    local = q % total
    start = local // block_len * block_len
    end = start + block_len
    clean = (q < total) & (kv < end)
    noise_self = (kv >= total + start) & (kv < total + end)
    noise_context = kv < start
    noisy = (q >= total) & (noise_self | noise_context)
    return clean | noisy | (q == kv)


def _block_causal_mask(num_frames: int, frame_seqlen: int, block: int) -> np.ndarray:
    """Self-Forcing's block-wise causal predicate (`_prepare_blockwise_causal_attn_mask`): kv < the
    end of q's block."""
    q = np.arange(num_frames * frame_seqlen)[:, None]
    kv = np.arange(num_frames * frame_seqlen)[None, :]
    block_len = block * frame_seqlen
    return kv < (q // block_len + 1) * block_len


@pytest.mark.parametrize("frames, block", [(9, 3), (6, 3), (4, 1), (8, 2)])
def test_plans_equal_self_forcings_masks(frames, block):
    seqlen = 2  # tokens per frame
    ones = np.ones((seqlen, seqlen), bool)
    tf = teacher_forcing_plan(frames, block)
    np.testing.assert_array_equal(np.kron(tf.frame_mask(), ones), _self_forcing_teacher_forcing_mask(frames, seqlen, block))
    bc = block_causal_plan(frames, block)
    np.testing.assert_array_equal(np.kron(bc.frame_mask(), ones), _block_causal_mask(frames, seqlen, block))
    assert bidirectional_plan(frames).frame_mask().all()
    # the plan computes exactly the mask's pairs: no FLOPs on masked-out blocks
    assert attended_pairs(tf, seqlen) == int(np.kron(tf.frame_mask(), ones).sum())
    with pytest.raises(ValueError, match="not whole blocks"):
        block_causal_plan(frames + 1, 3 if block == 1 else block)


def _rolling_mask(num_frames: int, frame_seqlen: int, block: int, window: int, sink: int, teacher: bool) -> np.ndarray:
    """Token-level reference of training under the rolling cache: Self-Forcing's eviction rule (a key
    frame f is held at a query block ending at frame E iff f < sink or f >= E - (window - sink)) laid
    over its teacher-forcing (or block-causal) predicate."""
    full = (_self_forcing_teacher_forcing_mask if teacher else _block_causal_mask)(num_frames, frame_seqlen, block)
    n = full.shape[0]
    q, kv = np.arange(n)[:, None], np.arange(n)[None, :]
    total = num_frames * frame_seqlen
    end = ((q % total) // (block * frame_seqlen) + 1) * block  # the query block's end frame
    f = (kv % total) // frame_seqlen  # the key's frame (clean or noisy copy)
    held = (f < sink) | (f >= end - (window - sink))
    own = (kv // total == q // total) & (f >= end - block)  # a block always sees its own frames
    return full & (held | own)


@pytest.mark.parametrize("frames, block, window, sink", [(12, 3, 9, 3), (12, 3, 6, 0), (15, 3, 7, 1), (8, 2, 4, 2)])
def test_rolling_plans_equal_the_rolling_caches_view(frames, block, window, sink):
    seqlen = 2
    ones = np.ones((seqlen, seqlen), bool)
    tf = teacher_forcing_plan(frames, block, window, sink)
    ref = _rolling_mask(frames, seqlen, block, window, sink, teacher=True)
    np.testing.assert_array_equal(np.kron(tf.frame_mask(), ones) | np.eye(len(ref), dtype=bool), ref)
    bc = block_causal_plan(frames, block, window, sink)
    np.testing.assert_array_equal(np.kron(bc.frame_mask(), ones), _rolling_mask(frames, seqlen, block, window, sink, False))
    assert attended_pairs(tf, seqlen) < attended_pairs(teacher_forcing_plan(frames, block), seqlen)  # fewer FLOPs
    assert teacher_forcing_plan(frames, block, frames, 0) == teacher_forcing_plan(frames, block)  # a window of it all
    with pytest.raises(ValueError, match="must hold a block"):
        teacher_forcing_plan(frames, block, sink + block - 1, sink)
    with pytest.raises(ValueError, match="with no sink"):
        block_causal_plan(frames, block, -1, 1)


def test_block_attention_equals_masked_dense_attention():
    """The plan's per-block dense attentions equal one attention under the dense mask (float32, 1e-5)."""
    plan = teacher_forcing_plan(6, 3)
    t = 3
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 12 * t, 4, 8)) for i in range(3))
    ours, _ = make_block_attention(plan, t, "xla")(q, k, v)
    mask = jnp.asarray(np.kron(plan.frame_mask(), np.ones((t, t), bool)))[None, None]
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    dit = CausalWanDiT(CFG)
    return dit, dit.init(jax.random.key(0))


def _batch(seed: int, b: int = 2, f: int = 6):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "latents": jax.random.normal(k1, (b, f, H, W, CFG.in_dim)),
        "text": jax.random.normal(k2, (b, CFG.text_len, CFG.text_dim)),
    }


def test_teacher_forcing_noisy_block_equals_the_cached_inference_forward(model):
    """The noisy half's output for block i equals the KV-cached forward of block i after the clean
    blocks 0..i-1 were run into the cache at t=0 (float32, 1e-5)."""
    from causal_dit_jax import InferenceConfig
    from causal_dit_jax.model.sampler import SelfForcingSampler

    dit, params = model
    batch = _batch(1, b=1)
    x0, context = batch["latents"], batch["text"]
    xt = jax.random.normal(jax.random.key(9), x0.shape)
    t_noisy = jnp.asarray([[700.0] * 3 + [300.0] * 3])
    seq = jnp.concatenate([x0, xt], 1)
    ts = jnp.concatenate([jnp.zeros((1, 6)), t_noisy], 1)
    time = np.arange(6)
    flow = sequence_forward(dit, params, seq, ts, context, teacher_forcing_plan(6, 3), np.concatenate([time, time]))
    sampler = SelfForcingSampler(dit, InferenceConfig(cache_dtype="float32"))
    text = dit.encode_text(params, context)
    rope = dit.rope_tables(6, H, W)
    cache = sampler.init_cache(1, 6, H, W)
    for i in range(2):
        if i:
            cache = sampler.prefill(params, text, x0[:, : 3 * i], sampler.init_cache(1, 6, H, W), 0, rope)
        out, _ = dit.forward(params, xt[:, 3 * i : 3 * i + 3], t_noisy[:, 3 * i : 3 * i + 3], text, cache, 3 * i, rope)
        np.testing.assert_allclose(flow[:, 6 + 3 * i : 9 + 3 * i], out, atol=1e-5)
    # and diffusion forcing's block i is the cached forward after noisy blocks (its own context)
    dflow = sequence_forward(dit, params, xt, t_noisy, context, block_causal_plan(6, 3), time)
    cache = sampler.prefill(params, text, xt[:, :3], sampler.init_cache(1, 6, H, W), 0, rope)
    cache = cache  # the prefill wrote block 0 at t=0; diffusion forcing's context is at its own t
    _, cache = dit.forward(params, xt[:, :3], t_noisy[:, :3], text, sampler.init_cache(1, 6, H, W), 0, rope)
    out, _ = dit.forward(params, xt[:, 3:], t_noisy[:, 3:], text, cache, 3, rope)
    np.testing.assert_allclose(dflow[:, 3:], out, atol=1e-5)


def test_rolling_teacher_forcing_equals_the_rolling_cache_inference(model):
    """Teacher forcing with a 9-frame window and a 3-frame sink over 12 frames (4 blocks): the noisy
    output of each block equals the KV-cached forward of that block after the clean blocks before it
    ran through a rolling cache of the same window and sink, which evicted block 1 before block 3
    (float32, 1e-5); the objective builds that plan from ObjectiveConfig."""
    from causal_dit_jax import InferenceConfig
    from causal_dit_jax.model.sampler import SelfForcingSampler

    dit, params = model
    f = 12
    batch = _batch(4, b=1, f=f)
    x0, context = batch["latents"], batch["text"]
    xt = jax.random.normal(jax.random.key(5), x0.shape)
    t_noisy = jnp.asarray([[800.0] * 3 + [600.0] * 3 + [400.0] * 3 + [200.0] * 3])
    plan = teacher_forcing_plan(f, 3, 9, 3)
    objective = FlowObjective(dit, ObjectiveConfig(local_attn_size=9, sink_size=3))
    assert objective.plan(f) == plan
    time = np.arange(f)
    seq, ts = jnp.concatenate([x0, xt], 1), jnp.concatenate([jnp.zeros((1, f)), t_noisy], 1)
    flow = sequence_forward(dit, params, seq, ts, context, plan, np.concatenate([time, time]))
    sampler = SelfForcingSampler(dit, InferenceConfig(cache_dtype="float32", local_attn_size=9, sink_size=3))
    text, rope = dit.encode_text(params, context), dit.rope_tables(f, H, W)
    assert sampler.init_cache(1, f, H, W).capacity == 3  # the sink's slot and a ring of 2: block 1 goes at block 3
    for i in range(4):
        cache = sampler.init_cache(1, f, H, W)
        if i:
            cache = sampler.prefill(params, text, x0[:, : 3 * i], cache, 0, rope)
        out, _ = dit.forward(params, xt[:, 3 * i : 3 * i + 3], t_noisy[:, 3 * i : 3 * i + 3], text, cache, 3 * i, rope)
        np.testing.assert_allclose(flow[:, f + 3 * i : f + 3 * i + 3], out, atol=1e-5)
    full = sequence_forward(dit, params, seq, ts, context, teacher_forcing_plan(f, 3), np.concatenate([time, time]))
    assert float(jnp.abs(full[:, f + 9 :] - flow[:, f + 9 :]).max()) > 1e-3  # the window changed block 3
    with pytest.raises(ValueError, match="train teacher or diffusion forcing"):
        ObjectiveConfig(kind="dmd", local_attn_size=9, sink_size=3)


@pytest.mark.parametrize("kind", ["teacher_forcing", "diffusion_forcing"])
def test_one_and_eight_devices_give_the_same_loss_and_gradients(model, kind):
    dit, params = model
    objective = FlowObjective(dit, ObjectiveConfig(kind=kind))
    batch = _batch(2, b=8)
    one = Trainer(objective, OptimizerConfig(learning_rate=1e-4))
    loss1, _, g1 = jax.jit(one.loss_and_grads)(params, batch, jax.random.key(3))
    mesh = train_mesh(8)
    many = Trainer(objective, OptimizerConfig(learning_rate=1e-4), mesh=mesh)
    state = many.init_state(params)
    sharded_leaves = [x for x in jax.tree.leaves(state["params"]) if not x.sharding.is_fully_replicated]
    assert sharded_leaves, "FSDP shards the large weights"
    placed = jax.device_put(batch, many.batch_sharding(batch))
    loss8, _, g8 = jax.jit(many.loss_and_grads)(state["params"], placed, jax.random.key(3))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    # a whole step on each: the same new params. Adam's first update is lr g / (|g| + eps), so a
    # gradient near eps turns float rounding into up to lr / 10 of difference: atol 1e-5 (lr 1e-4)
    s1 = one.init_state(params)
    s1, m1 = one.step(s1, batch)
    s8, m8 = many.step(state, batch)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_accumulation_ema_and_schedule(model):
    dit, params = model
    objective = FlowObjective(dit)
    batch = _batch(4, b=4)
    two = Trainer(objective, OptimizerConfig(accumulate=2))
    loss, _, grads = two.loss_and_grads(params, batch, jax.random.key(5))
    k0, k1 = jax.random.split(jax.random.key(5), 2)
    halves = [jax.tree.map(lambda x, i=i: x[2 * i : 2 * i + 2], batch) for i in range(2)]
    parts = [jax.value_and_grad(objective, has_aux=True)(params, h, k) for h, k in zip(halves, (k0, k1))]
    np.testing.assert_allclose(loss, (parts[0][0][0] + parts[1][0][0]) / 2, rtol=1e-5)
    for g, a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(parts[0][1]), jax.tree.leaves(parts[1][1])):
        np.testing.assert_allclose(g, (a + b) / 2, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="does not split into accumulate=3"):
        Trainer(objective, OptimizerConfig(accumulate=3)).loss_and_grads(params, batch, jax.random.key(0))
    # EMA: a copy before ema_start, then decay * ema + (1 - decay) * params
    trainer = Trainer(objective, OptimizerConfig(learning_rate=1e-3, ema_start=1, ema_decay=0.9))
    state = trainer.init_state(params)
    state, _ = trainer.step(state, batch)
    for e, p in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(e, p)
    before = jax.tree.map(np.asarray, state["ema"])  # the step consumes the state
    state, _ = trainer.step(state, batch)
    for e, b0, p in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(before), jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(e, 0.9 * b0 + 0.1 * p, rtol=1e-5, atol=1e-7)
    assert int(state["step"]) == 2
    # warmup then cosine
    sched = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine", total_steps=110))
    np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 60, 110)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    w = bell_weights(objective.timesteps)
    assert w.shape == (1000,) and abs(w.mean() - 1) < 1e-5 and w.min() == 0.0
    assert fsdp_spec((CFG.dim, CFG.ffn_dim), 8) == jax.sharding.PartitionSpec(None, "data")
    assert fsdp_spec((16,), 8) == jax.sharding.PartitionSpec()


def test_tiny_model_loss_falls(model):
    """A real decrease: 40 AdamW steps of teacher forcing on one fixed batch (the timestep and noise
    draws change every step) bring the loss under fixed evaluation draws under 3/4 of its start (the flow target keeps an
    irreducible part: eps is not predictable from x_t alone)."""
    dit, params = model
    objective = FlowObjective(dit)
    trainer = Trainer(objective, OptimizerConfig(learning_rate=3e-3, b1=0.9, warmup_steps=5))
    batch = _batch(6, b=2)
    evaluate = jax.jit(lambda p: objective(p, batch, jax.random.key(123))[0])
    start = float(evaluate(params))
    state = trainer.init_state(params)
    losses = []
    for _ in range(40):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    end = float(evaluate(state["params"]))
    print(f"teacher-forcing loss under fixed draws: {start:.3f} -> {end:.3f} (train loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    assert np.isfinite(losses).all() and end < 0.75 * start


def test_ode_trajectory_and_regression(model):
    """Teacher trajectories: recorded at the sampler's sigmas, starting at the noise, one Euler step
    per segment by hand, converging as the steps grow; the student's ODE-regression loss by hand, the
    same on 1 and 8 devices, and falling when trained."""
    from causal_dit_jax.train.block_attention import bidirectional_plan
    from causal_dit_jax.train.distill import OdeRegression, ode_sigma_grid, ode_trajectory, record_sigmas

    dit, params = model
    record = record_sigmas()
    np.testing.assert_allclose(record, [1.0, 0.9375, 0.8333333, 0.625], rtol=1e-6)
    grid = ode_sigma_grid(record, 3)
    assert len(grid) == 13 and grid[-1] == 0 and np.allclose(grid[::3][:4], record)
    batch = _batch(7, b=2)
    noise = jax.random.normal(jax.random.key(8), batch["latents"].shape)
    traj = jax.jit(lambda n: ode_trajectory(dit, params, n, batch["text"], steps_per_segment=1))(noise)
    assert traj.shape == (2, 5, 6, H, W, CFG.in_dim)
    np.testing.assert_array_equal(traj[:, 0], noise)
    t = jnp.full((2, 6), 1000.0)
    v = sequence_forward(dit, params, noise, t, batch["text"], bidirectional_plan(6), np.arange(6))
    np.testing.assert_allclose(traj[:, 1], noise + (record[1] - 1.0) * v, atol=1e-5)
    ends = {k: ode_trajectory(dit, params, noise, batch["text"], steps_per_segment=k)[:, -1] for k in (2, 4, 16)}
    assert float(jnp.abs(ends[4] - ends[16]).max()) < float(jnp.abs(ends[2] - ends[16]).max())  # Euler converges
    with pytest.raises(ValueError, match="needs a negative_context"):
        ode_trajectory(dit, params, noise, batch["text"], guidance_scale=3.0)

    student = OdeRegression(dit)
    data = {"trajectory": traj, "text": batch["text"]}
    loss, _ = student(params, data, jax.random.key(1))
    k = student.draw(jax.random.key(1), 2, 6)
    x = jnp.stack([traj[i, k[i], jnp.arange(6)] for i in range(2)])  # each frame at its block's step
    sigma = jnp.asarray(record)[k]
    flow = sequence_forward(dit, params, x, sigma * 1000, batch["text"], block_causal_plan(6, 3), np.arange(6))
    np.testing.assert_allclose(loss, jnp.mean((x - sigma[..., None, None, None] * flow - traj[:, -1]) ** 2), rtol=1e-5)
    assert (k[:, :3] == k[:, :1]).all() and (k[:, 3:] == k[:, 3:4]).all()  # one step per block

    big = {key: jnp.concatenate([v] * 4) for key, v in data.items()}  # batch 8, one per device
    one = Trainer(student, OptimizerConfig(learning_rate=1e-3, b1=0.9))
    loss1, _, g1 = jax.jit(one.loss_and_grads)(params, big, jax.random.key(2))
    many = Trainer(student, OptimizerConfig(learning_rate=1e-3, b1=0.9), mesh=train_mesh(8))
    state = many.init_state(params)
    loss8, _, g8 = jax.jit(many.loss_and_grads)(
        state["params"], jax.device_put(big, many.batch_sharding(big)), jax.random.key(2)
    )
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    evaluate = jax.jit(lambda p: student(p, data, jax.random.key(123))[0])
    start = float(evaluate(params))
    state = one.init_state(params)
    for _ in range(30):
        state, _ = one.step(state, data)
    end = float(evaluate(state["params"]))
    print(f"ODE regression loss under fixed draws: {start:.4f} -> {end:.4f}")
    assert end < 0.5 * start  # a deterministic target: the student fits it
