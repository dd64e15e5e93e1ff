"""The Wan VAE decoded in bands of rows over simulated CPU devices (`sharding/decode_bands.py`,
`sharding/row_halo.py`): frames and streamed caches equal one device's, and the compiled program
sends exactly the halo rows and the attention gather that `decode_traffic` predicts.

Random `tiny` params and latents, float32. Tolerance: max |banded - one device| <= 1e-5 on frames in
[-1, 1] (measured <= 2.7e-6: the banded convs sum in another order; nothing else differs), and on the
streamed caches 1e-5 of each cache's largest value (measured <= 2.9e-6 of it; values up to ~11).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from causal_dit_jax.autoencoders.wan_vae import WanVAE, get_vae_preset
from causal_dit_jax.sharding import make_mesh
from causal_dit_jax.sharding.decode_bands import BandedWanVAE, banded_decode, decode_traffic

TOL = 1e-5
CFG = get_vae_preset("tiny")  # channels 32/32/32/16/8, the last 2 stages per frame
W = 4  # latent columns


def row_mesh(n: int) -> Mesh:
    return Mesh(np.asarray(jax.devices()[:n]), ("rows",), axis_types=(AxisType.Auto,))


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def vae():
    return WanVAE(CFG)


@pytest.fixture(scope="module")
def params(vae):
    return vae.init(jax.random.key(0))


def latents(frames: int, height: int, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (1, frames, height, W, CFG.z_dim))


@pytest.fixture(scope="module")
def reference(vae, params):
    """One device's decode of a fresh latent video, by height."""
    memo = {}

    def decode(height):
        if height not in memo:
            z = latents(2, height, seed=height)
            memo[height] = z, np.asarray(vae.decode(params, z))
        return memo[height]

    return decode


@pytest.mark.parametrize("n", [2, 4, 8])
def test_decode_equals_one_device(vae, params, reference, n):
    """8 latent rows: bands of 4, 2 and 1 rows. On 8 devices the project's own mesh (ring 2 x
    ulysses 4 for 12 heads), banded over both sequence axes (the default axis)."""
    z, expected = reference(8)
    if n == 8:
        mesh = make_mesh(num_heads=12, strategy="hybrid", devices=jax.devices()[:8])
        frames = banded_decode(vae, params, z, mesh)
        spec = P(None, None, ("ring", "ulysses"))
    else:
        frames = banded_decode(vae, params, z, row_mesh(n), axis="rows")
        spec = P(None, None, "rows")
    assert frames.shape == expected.shape == (1, 5, 64, 8 * W, 3)
    assert np.mean(np.abs(expected) == 1.0) < 0.1  # the clip leaves most values informative
    assert frames.sharding.spec == spec  # sharded by rows
    assert max_err(frames, expected) <= TOL


@pytest.mark.parametrize("height", [5])
def test_height_not_divisible(vae, params, reference, height):
    """5 latent rows on 4 devices: bands of 2 padded to 8 rows, the third band half padding, the last all
    padding (the streamed test has 6 rows on 4)."""
    z, expected = reference(height)
    frames = banded_decode(vae, params, z, row_mesh(4), axis="rows")
    assert frames.shape == expected.shape == (1, 5, 8 * height, 8 * W, 3)
    assert frames.sharding.spec == P(None, None, "rows")  # re-split: 4 divides 8 * height
    assert max_err(frames, expected) <= TOL


def test_streamed_chunks_carry_sharded_caches(vae, params):
    """Chunks of 1, 2 and 4 latents (frames 1, 8, 16: the odd first chunk flips the ring caches'
    slot, the last takes the scanned per-frame path) with 6 latent rows on 4 devices (padded to 8).
    Each chunk's frames equal one device's streamed decode, the caches stay sharded by rows, and in
    one device's layout they equal its caches."""
    height = 6
    banded = BandedWanVAE(vae, row_mesh(4), axis="rows")
    placed = banded.place(params)
    z = latents(7, height, seed=3)
    cache, ref_cache = banded.init_decode_cache(1, height, W), vae.init_decode_cache(1, height, W)
    start = 0
    for size in (1, 2, 4):
        chunk = z[:, start : start + size]
        start += size
        frames, cache = banded.jit_decode_chunk(placed, chunk, cache)
        expected, ref_cache = vae.jit_decode_chunk(params, chunk, ref_cache)
        assert frames.shape == expected.shape
        assert max_err(frames, expected) <= TOL, size
        assert cache.tail_newest == ref_cache.tail_newest and not cache.first_chunk
        for leaf in jax.tree.leaves(cache.convs):
            assert leaf.sharding.spec == P(None, None, "rows")
        gathered = banded.gathered_cache(cache, height)
        for got, want in zip(jax.tree.leaves(gathered.convs), jax.tree.leaves(ref_cache.convs), strict=True):
            assert got.shape == want.shape
            assert max_err(got, want) <= TOL * max(1.0, float(jnp.max(jnp.abs(want))))


# ----------------------------------------------------------------------------- communication
_COLLECTIVE = re.compile(
    r"= (\(.*?\)|\S+) (all-to-all|collective-permute|all-gather|all-reduce|reduce-scatter"
    r"|collective-broadcast)(?:-start)?\("
)
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(kind, dtype, result shape) of every collective in compiled HLO text."""
    out = []
    for types, kind in _COLLECTIVE.findall(hlo):
        (dtype, dims), *rest = _SHAPE.findall(types)
        assert not rest, types  # one array per collective
        out.append((kind, dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


@pytest.mark.parametrize("n,height,first_chunk", [(4, 8, True), (2, 5, False)])
def test_compiled_collectives_match_traffic(vae, params, n, height, first_chunk):
    """One chunk of 2 latents: every collective-permute of the compiled chunk is a halo row
    [B, T, 1, W, C] of one spatial conv (two per conv), the one all-gather is the middle attention's
    frame, and their bytes are `traffic().bytes_sent`. Only float32 activations travel. With padding
    (5 rows on 2 devices) the crop re-splits the frames by rows: permutes of 3 channels, nothing else."""
    banded = BandedWanVAE(vae, row_mesh(n), axis="rows")
    cache = banded.init_decode_cache(1, height, W, wan_first_frame=first_chunk)
    z = jnp.zeros((1, 2, height, W, CFG.z_dim))
    hlo = jax.jit(banded.decode_chunk).lower(banded.place(params), z, cache).compile().as_text()
    found = collectives(hlo)
    assert {dtype for _, dtype, _ in found} == {"f32"}
    assert {kind for kind, _, _ in found} == {"collective-permute", "all-gather"}
    traffic = banded.traffic(2, height, W, first_chunk=first_chunk)
    halos = sorted(s for kind, _, s in found if kind == "collective-permute" and s[-1] != 3)
    assert halos == sorted(traffic.permutes)
    assert all(s[2] == 1 for s in halos)  # one row each way
    assert [s for kind, _, s in found if kind == "all-gather"] == list(traffic.gathers)
    frames = [s for kind, _, s in found if kind == "collective-permute" and s[-1] == 3]
    frame_shape = (1, CFG.num_frames(2, first_chunk))
    assert all(s[:2] == frame_shape and s[3:] == (8 * W, 3) for s in frames)
    assert bool(frames) == (height % n != 0)
    # the analytic bytes agree with the compiled program: each halo permute's operand, and
    # (n - 1) / n of each gathered frame
    sent = sum(4 * int(np.prod(s)) for s in halos)
    sent += sum(4 * int(np.prod(s)) * (n - 1) // n for kind, _, s in found if kind == "all-gather")
    assert traffic.bytes_sent == sent


def test_each_device_holds_a_band_of_the_activations(vae, params):
    """Device 0 no longer holds every decoder activation: the compiled chunk's temporary buffers per
    device (XLA's buffer assignment, `memory_analysis`) shrink with the bands, to under half of one
    device's on 8 devices (not to 1/8: the gathered middle frame, the halos and the buffers of the
    small early stages do not shrink; hence 24 columns here, not the 4 of the other tests)."""
    height, width = 16, 24
    z = jnp.zeros((1, 3, height, width, CFG.z_dim))
    one = jax.jit(vae.decode_chunk).lower(params, z, vae.init_decode_cache(1, height, width)).compile()
    temp = {1: one.memory_analysis().temp_size_in_bytes}
    for n in (2, 8):
        banded = BandedWanVAE(vae, row_mesh(n), axis="rows")
        cache = banded.init_decode_cache(1, height, width)
        compiled = jax.jit(banded.decode_chunk).lower(banded.place(params), z, cache).compile()
        temp[n] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[1] > temp[2] > temp[8] and temp[8] < 0.5 * temp[1], temp


def test_traffic_at_wan_size():
    """Wan2.1 in bf16 at 480x832 (60x104 latents, bands of 8 rows on 8 devices), a streamed chunk of
    3 latents (12 frames), counted by hand: per spatial conv 2 rows x width x channels x frames x 2
    bytes at its resolution, plus 7/8 of the gathered [1, 3, 64, 104, 384] frame."""
    cfg = get_vae_preset("wan2.1").replace(dtype="bfloat16")
    convs = [  # (spatial convs, frames, width, input channels)
        (1, 3, 104, 16),  # conv1
        (4, 3, 104, 384),  # middle: res0, res1
        (6, 3, 104, 384),  # stage0
        (1, 6, 104, 384),  # its upsample's 3x3 conv, after the time upsample (3 -> 6 frames)
        (1, 6, 208, 192),  # stage1: res0.conv1 (the upsample halved the width to 192)
        (5, 6, 208, 384),
        (1, 12, 208, 384),  # its upsample (6 -> 12 frames)
        (6, 12, 416, 192),  # stage2
        (1, 12, 416, 192),  # its upsample (2d)
        (6, 12, 832, 96),  # stage3
        (1, 12, 832, 96),  # head
    ]
    halo = sum(2 * n * f * w * c * 2 for n, f, w, c in convs)
    gather = 7 * 3 * 8 * 104 * 384 * 2
    traffic = decode_traffic(cfg, 8, 3, 60, 104, first_chunk=False)
    assert traffic.bytes_sent == halo + gather
    # the feed upsample, stage2, its upsample, stage3 and the head exchange one frame at a time
    assert len(traffic.permutes) == 2 * (1 + 4 + 6 + 1 + 1 + 5 + 12 * (1 + 6 + 1 + 6 + 1))
    assert decode_traffic(cfg, 1, 3, 60, 104).bytes_sent == 0


def test_bad_input_is_refused(vae, params):
    mesh = row_mesh(2)
    with pytest.raises(ValueError, match=r"axis 'seq' must name distinct axes of the mesh, whose axes are \('rows',\)"):
        BandedWanVAE(vae, mesh, axis="seq")
    with pytest.raises(ValueError, match="distinct axes"):
        BandedWanVAE(vae, mesh, axis=("rows", "rows"))
    banded = BandedWanVAE(vae, mesh, axis="rows")
    with pytest.raises(ValueError, match="channels-last"):
        banded.decode_chunk(params, jnp.zeros((1, 2, 4, W, 3)), banded.init_decode_cache(1, 4, W))
    with pytest.raises(ValueError, match="the cache does not fit latents of batch 1, 6 x 4 on 2 devices"):
        banded.decode_chunk(params, jnp.zeros((1, 2, 6, W, CFG.z_dim)), banded.init_decode_cache(1, 4, W))
    with pytest.raises(ValueError, match="the cache does not fit"):  # one device's cache is not a banded one
        banded.decode_chunk(params, jnp.zeros((1, 2, 4, W, CFG.z_dim)), vae.init_decode_cache(1, 4, W))
