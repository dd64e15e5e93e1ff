"""Sequence parallelism on 8 simulated CPU devices: results equal one device's, positions are local,
and the compiled program communicates exactly what each strategy predicts.

Tolerance 1e-5 (relative, float32): the sharded program does the same float32 math; only the
reduction order inside attention differs (ring: the online softmax over blocks).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from causal_dit_jax import CausalWanDiT, InferenceConfig, KernelConfig, SelfForcingSampler
from causal_dit_jax.model.config import get_preset
from causal_dit_jax.sharding import SequenceParallelDiT, make_mesh, split_sequence_devices

SP_TOL = 1e-5
CFG = get_preset("tiny")  # 12 heads, float32
LH, LW = 6, 10  # 3 x 5 = 15 tokens per frame, 45 per chunk: 2, 4 and 8 devices all need padding
FRAMES, START = 9, 4  # 3 chunks starting at global frame 4


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def setup():
    dit = CausalWanDiT(CFG)
    params = dit.init(jax.random.key(0))
    text = dit.encode_text(params, jax.random.normal(jax.random.key(1), (2, CFG.text_len, CFG.text_dim)))
    noise = jax.random.normal(jax.random.key(2), (2, FRAMES, LH, LW, CFG.in_dim))
    return dit, params, text, noise


def _rollout(model, setup, inference):
    _, params, text, noise = setup
    return SelfForcingSampler(model, inference).generate(params, text, noise, jax.random.key(3), START)


@pytest.fixture(scope="module")
def reference(setup):
    return _rollout(setup[0], setup, InferenceConfig(cache_dtype="float32"))


CASES = [
    (n, s) for s in ("ulysses", "ring", "hybrid") for n in (1, 2, 4, 8) if not (s == "ulysses" and n == 8)
]  # 12 heads: all-to-all over 8 is refused (see test below)


@pytest.mark.parametrize("n,strategy", CASES)
def test_rollout_equals_single_device(setup, reference, n, strategy):
    sp = SequenceParallelDiT(setup[0], make_mesh(n, strategy=strategy, num_heads=12))
    out = _rollout(sp, setup, InferenceConfig(cache_dtype="float32"))
    assert rel(out, reference) <= SP_TOL


@pytest.mark.parametrize("n,strategy", [(8, "ring"), (8, "hybrid"), (4, "ulysses")])
def test_local_window_with_sink_equals_single_device(setup, n, strategy):
    inference = InferenceConfig(local_attn_size=6, sink_size=3, cache_dtype="float32")
    dit, params, text, noise = setup
    noise = jnp.concatenate([noise, noise[:, :6] * -1.0], axis=1)  # 15 frames: 5 chunks, cache rolls
    setup_long = (dit, params, text, noise)
    ref = _rollout(dit, setup_long, inference)
    sp = SequenceParallelDiT(dit, make_mesh(n, strategy=strategy, num_heads=12))
    assert rel(_rollout(sp, setup_long, inference), ref) <= SP_TOL


@pytest.mark.parametrize("n,strategy", [(8, "ring"), (8, "hybrid"), (4, "ulysses")])
def test_frame_granular_window_equals_single_device(setup, n, strategy):
    """A 6-frame window with a 1-frame sink (Self-Forcing's frame counts, not whole chunks) over 5 chunks:
    the masked paths (ring: the frame mask per ring step for the block's owner; all-to-all: the masked
    local attention) equal one device's masked attention (SP_TOL)."""
    inference = InferenceConfig(local_attn_size=6, sink_size=1, cache_dtype="float32")
    dit, params, text, noise = setup
    noise = jnp.concatenate([noise, noise[:, :6] * -1.0], axis=1)  # 15 frames: 5 chunks, cache rolls
    setup_long = (dit, params, text, noise)
    ref = _rollout(dit, setup_long, inference)
    sp = SequenceParallelDiT(dit, make_mesh(n, strategy=strategy, num_heads=12))
    assert sp.init_cache(inference, 2, 15, LH, LW, START).frame_masked
    assert rel(_rollout(sp, setup_long, inference), ref) <= SP_TOL
    # and the window is not the whole-chunk one (the sink rounded up to a chunk)
    rounded = _rollout(dit, setup_long, InferenceConfig(local_attn_size=6, sink_size=3, cache_dtype="float32"))
    assert rel(rounded[:, 6:], ref[:, 6:]) > 1e-3


@pytest.mark.parametrize("n,strategy", [(8, "ring"), (8, "hybrid")])
def test_one_slot_cache_equals_single_device(setup, n, strategy):
    """A one-chunk stream: its 1-slot cache is smaller than the queries with their float32 result, so
    the ring passes the K/V block instead (`ring_traffic`); the result is one device's (SP_TOL)."""
    dit, params, text, noise = setup
    setup_short = (dit, params, text, noise[:, :3])
    inference = InferenceConfig(cache_dtype="float32")
    ref = _rollout(dit, setup_short, inference)
    sp = SequenceParallelDiT(dit, make_mesh(n, strategy=strategy, num_heads=12))
    assert rel(_rollout(sp, setup_short, inference), ref) <= SP_TOL


def test_data_axis_splits_prompts(setup, reference):
    sp = SequenceParallelDiT(setup[0], make_mesh(8, strategy="hybrid", data=2, num_heads=12))
    assert (sp.data_size, sp.ring_size, sp.ulysses_size) == (2, 1, 4)
    assert rel(_rollout(sp, setup, InferenceConfig(cache_dtype="float32")), reference) <= SP_TOL


def test_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="12 heads divisible by 8"):
        make_mesh(8, strategy="ulysses", num_heads=12)
    with pytest.raises(ValueError, match="data=3"):
        make_mesh(8, strategy="ring", data=3, num_heads=12)
    with pytest.raises(ValueError, match="unknown strategy"):
        make_mesh(2, strategy="tree", num_heads=12)
    assert split_sequence_devices(8, "hybrid", 12) == (2, 4)
    assert split_sequence_devices(6, "hybrid", 12) == (1, 6)
    # the split follows the model's heads, which make_mesh requires: 16 heads take all 8 in the all-to-all
    assert dict(make_mesh(8, strategy="hybrid", num_heads=16).shape) == {"data": 1, "ring": 1, "ulysses": 8}
    with pytest.raises(TypeError, match="num_heads"):
        make_mesh(8, strategy="hybrid")


@pytest.mark.parametrize("n,strategy", [(2, "ulysses"), (4, "ring"), (8, "hybrid")])
def test_shard_positions_in_the_sharded_forward(setup, n, strategy):
    """The positions are derived where the sharded forward derives them (each shard's offset from
    `lax.axis_index`, then `causal_rope_positions`), tested through that forward: one chunk at global
    frame 1000 over a padded 45-token chunk equals one device. RoPE is relative, so a shift of every
    position would not show: the time table's rows are shuffled (each row still a rotation), which
    makes each token's absolute frame matter; the chunk at frame 0 then gives another flow."""
    dit, params, text, noise = setup
    sp = SequenceParallelDiT(dit, make_mesh(n, strategy=strategy, num_heads=12))
    x, t = noise[:, :3], jnp.full((2, 3), 937.5)
    rope = dit.rope_tables(1003, LH, LW)
    rows = jax.random.permutation(jax.random.key(7), rope.max_frames)
    rope = rope._replace(cos_t=rope.cos_t[rows], sin_t=rope.sin_t[rows])

    def flow(model, start):
        return jax.jit(model.forward)(params, x, t, text, None, start, rope)[0]

    far = flow(sp, 1000)
    assert rel(far, flow(dit, 1000)) <= SP_TOL
    assert rel(far, flow(sp, 0)) > 1e-3


# ----------------------------------------------------------------------------- communication
_COLLECTIVE = re.compile(
    r"= (\(.*?\)|\S+) (all-to-all|collective-permute|all-gather|all-reduce|reduce-scatter"
    r"|collective-broadcast)(?:-start)?\("
)
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo: str) -> list[tuple[str, str, list[tuple[int, ...]]]]:
    """(kind, dtype, operand shapes) of every collective in compiled HLO text."""
    out = []
    for types, kind in _COLLECTIVE.findall(hlo):
        shapes = [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(types)]
        out.append((kind, shapes[0][0], [s for _, s in shapes]))
    return out


def _compiled_chunk_step(setup, n, strategy, cached=True):
    """The compiled HLO of one chunk forward (with the 3-slot cache of a 9-frame stream, or none)."""
    dit, params, text, _ = setup
    sp = SequenceParallelDiT(dit, make_mesh(n, strategy=strategy, num_heads=12))
    inference = InferenceConfig(cache_dtype="float32")
    cache = sp.init_cache(inference, 2, FRAMES, LH, LW, START) if cached else None
    x = jnp.zeros((2, 3, LH, LW, CFG.in_dim))
    t = jnp.full((2, 3), 500.0)
    rope = sp.rope_tables(START + FRAMES, LH, LW)
    hlo = jax.jit(sp.forward).lower(params, x, t, text, cache, START + 3, rope).compile().as_text()
    return sp, inference, hlo


@pytest.mark.parametrize(
    "n,strategy,cached",
    [(4, "ulysses", True), (8, "ring", True), (8, "hybrid", True), (8, "ring", False), (8, "hybrid", False)],
)
def test_compiled_collectives_match_strategy(setup, n, strategy, cached):
    """Per layer (the scanned layer body appears once in the HLO): all-to-all strategies exchange
    q/k/v in one all-to-all and the output in another. A ring of R with a cache of several slots
    circulates the queries: R-1 hops of the query block [B, Lseg, N/U, D] and R-1 of its float32
    result (out of that shape, lse [B, N/U, Lseg]); no key or value moves, and nothing is shaped like
    the cache. Without a cache it passes the chunk's K and V segments R-1 times instead (cheaper).
    Outside the layers there is exactly one all-gather: the chunk's output tokens for unpatchify.
    Nothing else moves: no integer data, nothing shaped like positions or RoPE tables.
    The bytes are `comm_bytes_per_forward`'s, whatever the cache's fill (the start frame is traced:
    one program serves every chunk)."""
    sp, inference, hlo = _compiled_chunk_step(setup, n, strategy, cached)
    assert hlo.count(" while(") == 1, "layers should stay one scanned loop"
    r, u = sp.ring_size, sp.ulysses_size
    b, d, heads = 2, CFG.head_dim, CFG.num_heads
    lay = sp.layout(3, LH, LW)
    block = (b, lay.segment_len, heads // u, d)
    if cached:  # 3 cache slots (9 frames / 3): the queries and their result circulate
        hops = [block, block, (b, heads // u, lay.segment_len)]
    else:  # the chunk's own K and V segments
        hops = [block, block]
    found = collectives(hlo)
    kinds = [k for k, _, _ in found]
    assert kinds.count("all-to-all") == (2 if u > 1 else 0)
    assert kinds.count("all-gather") == 1
    assert set(kinds) <= {"all-to-all", "collective-permute", "all-gather"}
    permuted = sorted(s for kind, _, shapes in found if kind == "collective-permute" for s in shapes)
    assert permuted == sorted(hops * (r - 1))
    for kind, dtype, shapes in found:
        assert dtype == "f32", (kind, dtype)  # only activations / keys / values / softmax statistics travel
        elements = sum(int(np.prod(s)) for s in shapes)
        if kind == "all-to-all":
            assert elements in (3 * b * lay.local_len * heads * d, b * lay.local_len * heads * d)
        elif kind == "all-gather":
            assert shapes == [(b, lay.padded_len, CFG.out_features)]
    # the analytic byte count used by `causal-dit bench --mesh` agrees with the compiled program
    sent = 0
    for kind, _, shapes in found:
        nbytes = 4 * sum(int(np.prod(s)) for s in shapes)
        if kind == "all-to-all":
            sent += nbytes * (u - 1) // u
        elif kind == "collective-permute":
            sent += nbytes
    frames = FRAMES if cached else None
    assert sp.comm_bytes_per_forward(inference, LH, LW, frames, batch=b) == CFG.num_layers * sent


def test_ring_sends_queries_for_a_cache_and_keys_without():
    """At the real size (1.3B: 12 heads x 128, 4680 tokens a chunk, bf16) a ring's traffic with a KV
    cache does not grow with the video; the K/V block (every slot) is sent only when it is smaller."""
    from causal_dit_jax.sharding.ring import ring_traffic

    args = (8, 1, 585, 12, 128)  # ring 8: 585 tokens a member
    q_hop = 585 * 12 * 128 * (2 + 4) + 12 * 585 * 4  # bf16 q, f32 out, f32 lse
    assert ring_traffic(*args, 7, 2, 2) == ("queries", 7 * q_hop)  # 81 frames: 7 slots
    assert ring_traffic(*args, 2, 2, 2) == ("queries", 7 * q_hop)
    assert ring_traffic(*args, 1, 2, 2) == ("keys", 7 * 2 * 585 * 12 * 128 * 2)  # no cache: one segment


def test_sharded_attention_is_differentiable(setup):
    """Fine-tuning needs jax.grad through the sharded forward: it equals the single-device gradient."""
    dit, params, text, _ = setup
    x = jax.random.normal(jax.random.key(7), (2, 3, LH, LW, CFG.in_dim))
    t = jnp.full((2, 3), 700.0)
    rope = dit.rope_tables(6, LH, LW)

    def loss(model):
        def f(p):
            out, _ = model.forward(p, x, t, text, None, 3, rope)
            return jnp.mean(out**2)

        return jax.jit(jax.grad(f))(params)

    g1 = loss(dit)
    for strategy in ("ring", "hybrid"):
        g8 = loss(SequenceParallelDiT(dit, make_mesh(8, strategy=strategy, num_heads=12)))
        leaves1, leaves8 = jax.tree.leaves(g1), jax.tree.leaves(g8)
        err = max(rel(a, b) for a, b in zip(leaves8, leaves1) if float(jnp.linalg.norm(b)) > 0)
        assert err <= 1e-4, strategy


def test_sharded_attention_with_a_cache_is_differentiable(setup):
    """jax.grad through two chunk forwards on a ring of 8 with a KV cache (the query-passing ring: the
    second chunk's queries visit the members' cached keys of the first): one device's gradient."""
    dit, params, text, _ = setup
    x = jax.random.normal(jax.random.key(7), (2, 6, LH, LW, CFG.in_dim))
    t = jnp.full((2, 3), 700.0)
    rope = dit.rope_tables(6, LH, LW)
    inference = InferenceConfig(cache_dtype="float32")

    def loss(model):
        def f(p):
            cache = model.init_cache(inference, 2, 6, LH, LW)
            _, cache = model.forward(p, x[:, :3], t, text, cache, 0, rope)
            out, _ = model.forward(p, x[:, 3:], t, text, cache, 3, rope)
            return jnp.mean(out**2)

        return jax.jit(jax.grad(f))(params)

    g1 = loss(dit)
    g8 = loss(SequenceParallelDiT(dit, make_mesh(8, strategy="ring", num_heads=12)))
    err = max(rel(a, b) for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)) if float(jnp.linalg.norm(b)) > 0)
    assert err <= 1e-4


def test_all_to_all_cache_is_in_whole_pages_for_paged_attention():
    """With cuDNN paged attention the all-to-all mesh's cache key axis is rounded up to whole 256-key
    pages (as on one device); a ring's is not (its per-member segments are read by slicing)."""
    inference = InferenceConfig()
    dit = CausalWanDiT(CFG, KernelConfig(attention_impl="cudnn_paged"))
    chunk = 3 * CFG.tokens_per_frame(4, 6)  # 72 tokens, 2 slots for 6 frames
    paged = SequenceParallelDiT(dit, make_mesh(2, strategy="ulysses", num_heads=CFG.num_heads))
    assert paged.init_cache(inference, 1, 6, 4, 6).k.shape[2] == 256
    plain = SequenceParallelDiT(
        CausalWanDiT(CFG, KernelConfig(attention_impl="xla")), make_mesh(2, strategy="ulysses", num_heads=CFG.num_heads)
    )
    assert plain.init_cache(inference, 1, 6, 4, 6).k.shape[2] == 2 * chunk
    ring = SequenceParallelDiT(dit, make_mesh(2, strategy="ring", num_heads=CFG.num_heads))
    assert ring.init_cache(inference, 1, 6, 4, 6).k.shape[2] == 2 * 2 * chunk // 2  # 2 members x 2 slots x 36
