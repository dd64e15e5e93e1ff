"""Video rows split over a mesh axis (inside `jax.shard_map`): each device holds a band of consecutive
rows of every frame; halo rows come from its neighbours by `ppermute`, the whole frame by `all_gather`.

Tensors are [B, T, H, W, C] with the rows on axis 2. A band at the base resolution has `rows` rows;
at a resolution `s` times finer, `s * rows`. When the devices do not divide the height, the last band(s)
end in padding rows, which `zero_padding` sets to zero: what a conv's zero padding at the image's
bottom edge would read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ROW_AXIS = 2  # [B, T, H, W, C]

Axis = str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RowBands:
    """`height` rows at the base resolution over the `devices` devices of mesh axis (or axes) `axis`."""

    axis: Axis
    devices: int
    height: int

    def __post_init__(self):
        if self.devices < 1 or self.height < 1:
            raise ValueError(f"need at least one device and one row, got {self.devices} devices, {self.height} rows")

    @property
    def rows(self) -> int:
        """Rows per device at the base resolution (the last band(s) padded)."""
        return -(-self.height // self.devices)

    @property
    def padded(self) -> bool:
        return self.rows * self.devices != self.height

    def scale(self, x: jax.Array) -> int:
        """How many times finer than the base resolution x's band is."""
        s, rest = divmod(x.shape[ROW_AXIS], self.rows)
        if rest or s < 1:
            raise ValueError(f"a band of {x.shape[ROW_AXIS]} rows is not a multiple of the base band's {self.rows}")
        return s


def zero_padding(bands: RowBands, x: jax.Array) -> jax.Array:
    """x [B, T, r, W, C] (this device's band) with the rows past the image's true height set to zero."""
    if not bands.padded:
        return x
    s, r = bands.scale(x), x.shape[ROW_AXIS]
    row = jax.lax.axis_index(bands.axis) * r + jnp.arange(r)  # global row of each band row
    return jnp.where((row < s * bands.height)[:, None, None], x, jnp.zeros((), x.dtype))


def with_halo(bands: RowBands, x: jax.Array, halo: int = 1) -> jax.Array:
    """x [B, T, r, W, C] -> [B, T, halo + r + halo, W, C]: the last `halo` rows of the band above and the
    first of the band below around it; zeros above the first band and below the last (the image's edge).
    Two collective-permutes of [B, T, halo, W, C]."""
    if halo == 0:
        return x
    if x.shape[ROW_AXIS] < halo:
        raise ValueError(f"a halo of {halo} rows needs bands of at least {halo} rows, got {x.shape[ROW_AXIS]}")
    n = bands.devices
    if n == 1:
        return jnp.pad(x, ((0, 0), (0, 0), (halo, halo), (0, 0), (0, 0)))
    down = [(i, i + 1) for i in range(n - 1)]  # device i's bottom rows go to device i + 1
    above = jax.lax.ppermute(x[:, :, -halo:], bands.axis, down)  # device 0 receives zeros
    below = jax.lax.ppermute(x[:, :, :halo], bands.axis, [(j, i) for i, j in down])  # the last device: zeros
    return jnp.concatenate([above, x, below], axis=ROW_AXIS)  # b t (halo + r + halo) w c


def gather_rows(bands: RowBands, x: jax.Array) -> jax.Array:
    """x [B, T, r, W, C] (this device's band, r = s * rows) -> the whole frame [B, T, s * height, W, C],
    padding rows dropped. One all-gather of [B, T, devices * r, W, C]."""
    s = bands.scale(x)
    if bands.devices > 1:
        x = jax.lax.all_gather(x, bands.axis, axis=ROW_AXIS, tiled=True)  # b t (n r) w c
    return x[:, :, : s * bands.height]


def own_rows(bands: RowBands, frame: jax.Array) -> jax.Array:
    """The whole frame [B, T, s * height, W, C] -> this device's band [B, T, s * rows, W, C]."""
    s = frame.shape[ROW_AXIS] // bands.height
    r = s * bands.rows
    frame = jnp.pad(frame, ((0, 0), (0, 0), (0, bands.devices * r - frame.shape[ROW_AXIS]), (0, 0), (0, 0)))
    if bands.devices == 1:
        return frame
    return jax.lax.dynamic_slice_in_dim(frame, jax.lax.axis_index(bands.axis) * r, r, axis=ROW_AXIS)
