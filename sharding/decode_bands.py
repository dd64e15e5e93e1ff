"""The Wan2.1 VAE decoder spatially parallel under `jax.shard_map`: each device of a mesh axis decodes a
band of rows of every latent frame, and of every activation inside the decoder.

The decoder is `WanVAEDecoder` itself, the same params tree and the same composition; its graph for a
band of rows (`band_graphdef`) sets three of its layers' hooks:

* every causal 3x3x3 conv gets one halo row from each neighbour at its resolution (`row_halo.with_halo`)
  and runs with zero padding in the columns only (`Conv(padding=...)`), so band + 2 rows give the
  band's rows. Its cache (the time taps carried between chunks) keeps the conv's input WITH the halo
  rows, so a chunk exchanges the halos of its new frames only;
* the upsample's "nearest x2, then 3x3 conv" runs on the band plus one halo row at the low resolution
  and keeps the band's 2r rows (the upsample's own padding only reaches the rows dropped);
* the middle attention block gathers the (small) lowest-resolution frame, runs whole, and keeps the
  device's rows. Norms, SiLU, the 1x1 convs and the time convs are row-local.

A latent height the devices do not divide is padded at the bottom; before every conv the padding rows
are zeroed (what the conv's zero padding at the image's edge reads), attention drops them, and the
frames are cropped. Frames come back sharded by rows over the axis (NamedSharding P(None, None, axis)):
the decoders' bands when the devices divide the latent height; otherwise the cropped frames re-split
evenly when the devices divide their height 8h (collective-permutes of frame rows; 1, 2, 4, 8 devices
always do), else replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from causal_dit_jax.autoencoders.chunked_decode import ChunkedDecode
from causal_dit_jax.autoencoders.wan_vae import AttentionBlock, Conv, Upsample, VAEConfig, VAEDecodeCache, WanVAE, WanVAEDecoder
from causal_dit_jax.model.config import dtype_from_name
from causal_dit_jax.sharding.mesh import SEQ_AXES
from causal_dit_jax.sharding.row_halo import Axis, RowBands, gather_rows, own_rows, with_halo, zero_padding

Params = dict


# ------------------------------------------------------------------------------ banded layers
def _conv_rows(bands: RowBands, halo: int, x: jax.Array) -> jax.Array:
    """A conv's band x [B, T, r, W, C] -> [B, T, halo + r + halo, W, C]: padding rows zeroed (the image
    edge's zeros), the neighbours' rows around it; the conv, padding columns only, gives r rows back."""
    return with_halo(bands, zero_padding(bands, x), halo)


def _crop_upsampled_halo(x: jax.Array) -> jax.Array:
    """After nearest x2 and the 3x3 conv of a band with one halo row each side: [B, T, 2 + 2r + 2, ...]
    -> the band's [B, T, 2r, ...] (the conv's own padding only reaches the rows dropped)."""
    return x[:, :, 2:-2]


def band_graphdef(config: VAEConfig, bands: RowBands) -> tuple[nnx.GraphDef, WanVAEDecoder]:
    """The graph of `WanVAEDecoder` (same params tree, same composition) for a band of rows: every
    causal 3x3x3 conv pads only its columns and takes its neighbours' rows first (`Conv.rows`), each
    spatial upsample takes one neighbouring row at the low resolution and crops after (`Upsample.rows`),
    and the middle attention attends over the gathered frame (`AttentionBlock.whole_frame`).
    Returns (graphdef, abstract model)."""
    model = nnx.eval_shape(lambda: WanVAEDecoder(config, rngs=nnx.Rngs(0)))
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Conv) and len(module.window) == 3 and module.window[1] > 1:
            module.padding = ((0, 0), (module.window[2] // 2,) * 2)
            module.rows = functools.partial(_conv_rows, bands, module.window[1] // 2)
        elif isinstance(module, Upsample):
            module.rows = (functools.partial(_conv_rows, bands, 1), _crop_upsampled_halo)
        elif isinstance(module, AttentionBlock):
            module.whole_frame = (functools.partial(gather_rows, bands), functools.partial(own_rows, bands))
    return nnx.graphdef(model), model


# ------------------------------------------------------------------------------ accounting
@dataclasses.dataclass(frozen=True)
class DecodeTraffic:
    """The collectives of one chunk's banded decode, as every device's program has them.

    permutes: the shape of each halo collective-permute, [B, T, 1, W, C] (two per spatial conv: the row
    going up and the row going down; the per-frame stages exchange one frame at a time).
    gathers: the result shape of each all-gather, [B, T, devices * rows, W, C] (the attention's frame).
    """

    permutes: tuple[tuple[int, ...], ...]
    gathers: tuple[tuple[int, ...], ...]
    itemsize: int
    devices: int

    @property
    def bytes_sent(self) -> int:
        """Bytes an interior device sends: every halo row (the first and last devices send one of each
        pair) and (devices - 1) / devices of each gathered frame."""
        halo = sum(math.prod(s) for s in self.permutes)
        gathered = sum(math.prod(s) for s in self.gathers) * (self.devices - 1) // self.devices
        return self.itemsize * (halo + gathered)


def decode_traffic(
    config: VAEConfig,
    devices: int,
    latent_frames: int,
    latent_height: int,
    latent_width: int,
    batch: int = 1,
    first_chunk: bool = True,
) -> DecodeTraffic:
    """What a chunk of `latent_frames` latents sends over `devices` bands, from the config alone.

    Per spatial conv (halo rows at its input's resolution, channels and frames): conv1 (z_dim), the
    middle's 4 convs, each stage's 2 (num_res_blocks + 1) convs, each upsample's 3x3 conv (at the low
    resolution, after the time upsample doubled the frames: 2T - 1 for a video's first chunk) and the
    head; plus the middle attention's all-gather. The convs of the last `per_frame_stages` stages, the
    upsample feeding them and the head run one frame at a time (unrolled up to MAX_UNROLLED_FRAMES
    frames; past that one scanned body, the same bytes). Not counted: with a padded height, the
    re-split of the cropped frames (`BandedWanVAE.decode_chunk`).
    """
    if devices == 1:
        return DecodeTraffic((), (), jnp.dtype(dtype_from_name(config.dtype)).itemsize, 1)
    rows = -(-latent_height // devices)  # latent rows per band
    dims = config.decoder_dims
    stages = len(config.dim_mult)
    split = stages - config.per_frame_stages
    permutes = []
    frames, width = latent_frames, latent_width

    def halo(channels, per_frame=False):
        shape = (batch, 1 if per_frame else frames, 1, width, channels)
        permutes.extend([shape] * (2 * (frames if per_frame else 1)))

    halo(config.z_dim)  # conv1
    for _ in range(4):  # middle: res0, res1
        halo(dims[0])
    gathers = [(batch, frames, devices * rows, width, dims[0])]
    for i in range(stages):
        c_in, c_out = (dims[i] if i == 0 else dims[i] // 2), dims[i + 1]
        per_frame = i >= split
        for j in range(config.num_res_blocks + 1):
            halo(c_in if j == 0 else c_out, per_frame)
            halo(c_out, per_frame)
        if i < stages - 1:
            if config.temporal_upsample[i]:
                frames = 2 * frames - 1 if first_chunk else 2 * frames
            halo(c_out, per_frame=config.per_frame_stages > 0 and i >= split - 1)
            rows, width = 2 * rows, 2 * width
    halo(dims[-1], per_frame=config.per_frame_stages > 0)  # head
    return DecodeTraffic(tuple(permutes), tuple(gathers), jnp.dtype(dtype_from_name(config.dtype)).itemsize, devices)


# ------------------------------------------------------------------------------ the public decoder
class BandedWanVAE(ChunkedDecode):
    """`WanVAE`'s streaming decode with the latent rows split over mesh axis (or axes) `axis` of `mesh`.

    Same params as `WanVAE` (place them on the mesh with `place`); `init_decode_cache` and
    `decode_chunk` have `WanVAE`'s contract, and `decode` (from `ChunkedDecode`) the whole-video one.
    The caches are a `VAEDecodeCache` whose arrays are sharded by rows: device i's block holds its band
    (with the halo rows for the spatial convs' caches); `gathered_cache` gives one device's layout.
    Other mesh axes hold copies (each decodes the same frames).
    """

    def __init__(self, vae: WanVAE | VAEConfig, mesh: Mesh, axis: Axis = SEQ_AXES):
        self.config = vae.config if isinstance(vae, WanVAE) else vae
        names = (axis,) if isinstance(axis, str) else tuple(axis)
        missing = [a for a in names if a not in mesh.axis_names]
        if not names or missing or len(set(names)) != len(names):
            raise ValueError(f"axis {axis!r} must name distinct axes of the mesh, whose axes are {mesh.axis_names}")
        self.mesh, self.axis = mesh, axis
        self.devices = math.prod(mesh.shape[a] for a in names)
        self._abstract = nnx.eval_shape(lambda: WanVAEDecoder(self.config, rngs=nnx.Rngs(0)))
        self._graphdefs = {}  # latent height -> the banded graph (its layers hold the bands)

    def place(self, params: Params) -> Params:
        """Params replicated over the mesh."""
        return jax.device_put(params, NamedSharding(self.mesh, P()))

    def bands(self, latent_height: int) -> RowBands:
        return RowBands(self.axis, self.devices, latent_height)

    def traffic(self, latent_frames, latent_height, latent_width, batch=1, first_chunk=True) -> DecodeTraffic:
        """The collectives of one `decode_chunk` (`decode_traffic` for this config and device count)."""
        return decode_traffic(self.config, self.devices, latent_frames, latent_height, latent_width, batch, first_chunk)

    # ------------------------------------------------------------------ caches
    def _halo_rows(self, path) -> int:
        """Halo rows of the cache at `path`: the kernel's row reach of the conv it feeds (0: a time conv)."""
        module = functools.reduce(getattr, [k.key for k in path], self._abstract.decoder)
        conv = module if isinstance(module, Conv) else module.conv  # the head's cache is its conv's
        return conv.window[-2] // 2

    def _cache_shapes(self, batch: int, latent_height: int, latent_width: int) -> dict:
        """Global ShapeDtypeStructs: [B, 2, devices * (r + 2h), W, C] per cache, r its band's rows."""
        dtype = dtype_from_name(self.config.dtype)
        rows = self.bands(latent_height).rows
        band = jax.eval_shape(lambda: self._abstract.decoder.init_cache(batch, rows, latent_width, dtype))

        def grow(path, leaf):
            b, t, r, w, c = leaf.shape
            return jax.ShapeDtypeStruct((b, t, self.devices * (r + 2 * self._halo_rows(path)), w, c), leaf.dtype)

        return jax.tree_util.tree_map_with_path(grow, band)

    def init_decode_cache(
        self, batch: int, latent_height: int, latent_width: int, wan_first_frame: bool = True
    ) -> VAEDecodeCache:
        """Zero caches for a new video, made in place on each device (as `WanVAE.init_decode_cache`)."""
        where = NamedSharding(self.mesh, P(None, None, self.axis))
        shapes = self._cache_shapes(batch, latent_height, latent_width)
        convs = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=where), shapes)
        return VAEDecodeCache(convs=convs, first_chunk=wan_first_frame)

    def gathered_cache(self, cache: VAEDecodeCache, latent_height: int) -> VAEDecodeCache:
        """The banded caches in one device's layout (`WanVAE.init_decode_cache`'s shapes): halo and
        padding rows dropped."""
        bands, n = self.bands(latent_height), self.devices

        def strip(path, c):
            h = self._halo_rows(path)
            b, t, rows, w, ch = c.shape
            band = c.reshape(b, t, n, rows // n, w, ch)[:, :, :, h : rows // n - h]  # b t (n R) w c -> b t n r w c
            r = band.shape[3]
            full = band.reshape(b, t, n * r, w, ch)  # b t n r w c -> b t (n r) w c
            return full[:, :, : bands.height * (r // bands.rows)]

        convs = jax.tree_util.tree_map_with_path(strip, cache.convs)
        return VAEDecodeCache(convs=convs, first_chunk=cache.first_chunk, tail_newest=cache.tail_newest)

    # ------------------------------------------------------------------ decode
    def decode_chunk(self, params: Params, z: jax.Array, cache: VAEDecodeCache) -> tuple[jax.Array, VAEDecodeCache]:
        """Normalised latents z [B, T, h, w, z_dim] -> (frames [B, T', 8h, 8w, 3] float32 in [-1, 1], the
        updated banded cache); `WanVAE.decode_chunk` over the mesh. Pure and jittable."""
        cfg = self.config
        if z.ndim != 5 or z.shape[-1] != cfg.z_dim:
            raise ValueError(f"latents must be [batch, frames, height, width, {cfg.z_dim}] (channels-last), got {z.shape}")
        b, _, height, width, _ = z.shape
        expected = self._cache_shapes(b, height, width)
        same_tree = jax.tree.structure(cache.convs) == jax.tree.structure(expected)
        if not same_tree or any(c.shape != s.shape for c, s in zip(jax.tree.leaves(cache.convs), jax.tree.leaves(expected))):
            raise ValueError(
                f"the cache does not fit latents of batch {b}, {height} x {width} on {self.devices} devices: "
                "make it with this decoder's init_decode_cache"
            )
        bands = self.bands(height)
        pad = bands.rows * bands.devices - height
        z = jnp.pad(z.astype(jnp.float32), ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))  # b t (n rows) w c
        rows_spec = P(None, None, self.axis)
        cache_specs = jax.tree.map(lambda _: rows_spec, cache.convs)
        static = {}  # the new tail_newest: a Python int, known once traced

        if height not in self._graphdefs:
            self._graphdefs[height] = band_graphdef(cfg, bands)[0]
        graphdef = self._graphdefs[height]

        def shard(params, z, convs):  # z [B, T, rows, w, z_dim]: this device's band
            model = nnx.merge(graphdef, params)
            mean = jnp.asarray(cfg.latent_mean, jnp.float32)
            std = jnp.asarray(cfg.latent_std, jnp.float32)
            x = model.conv2(z * std + mean).astype(dtype_from_name(cfg.dtype))
            x, convs, static["newest"] = model.decoder(x, convs, cache.first_chunk, cache.tail_newest)
            return jnp.clip(x.astype(jnp.float32), -1.0, 1.0), convs

        frames, convs = jax.shard_map(
            shard, mesh=self.mesh, in_specs=(P(), rows_spec, cache_specs), out_specs=(rows_spec, cache_specs)
        )(params, z, cache.convs)
        if pad:  # b t (8 n rows) W 3 -> b t 8h W 3, re-split by rows when the devices divide 8h
            frames = frames[:, :, : cfg.spatial_factor * height]
            even = frames.shape[2] % self.devices == 0
            frames = jax.lax.with_sharding_constraint(frames, NamedSharding(self.mesh, rows_spec if even else P()))
        return frames, VAEDecodeCache(convs=convs, first_chunk=False, tail_newest=static["newest"])


def decoder_mesh(devices) -> Mesh:
    """A mesh over a decoder's own devices (none of the DiT's) whose sequence axes span them all: the
    bands of rows of a `BandedWanVAE` on devices of its own."""
    from causal_dit_jax.sharding.mesh import make_mesh

    return make_mesh(devices=list(devices), num_heads=1, strategy="ring")


def banded_decode(
    vae: WanVAE | VAEConfig,
    params: Params,
    latents: jax.Array,
    mesh: Mesh,
    axis: Axis = SEQ_AXES,
    frames_per_chunk: int | None = 3,
) -> jax.Array:
    """A whole latent video [B, T, h, w, z_dim] -> frames [B, 1 + 4 (T - 1), 8h, 8w, 3], decoded in
    bands of rows over `axis` of `mesh`, `frames_per_chunk` latents at a time (as `WanVAE.decode`).
    Sharded by rows (see the module's docstring). Build a `BandedWanVAE` once to reuse its compiled
    chunks."""
    decoder = BandedWanVAE(vae, mesh, axis)
    return decoder.decode(decoder.place(params), latents, frames_per_chunk)


__all__ = ["BandedWanVAE", "DecodeTraffic", "band_graphdef", "banded_decode", "decode_traffic", "decoder_mesh"]
