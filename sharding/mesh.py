"""Device meshes for sequence parallelism: axes ('data', 'ring', 'ulysses').

The chunk's token sequence is partitioned over ('ring', 'ulysses') together; 'ulysses' is the
all-to-all (head-exchange) part and 'ring' the part whose blocks circulate (`ring.py`). A pure all-to-all mesh has
ring = 1, a pure ring mesh ulysses = 1, the hybrid both. 'data' splits a batch of prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA, RING, ULYSSES = "data", "ring", "ulysses"
SEQ_AXES = (RING, ULYSSES)
STRATEGIES = ("ulysses", "ring", "hybrid")


def split_sequence_devices(n: int, strategy: str, num_heads: int) -> tuple[int, int]:
    """(ring, ulysses) sizes for `n` sequence devices under `strategy`, validated against the heads.

    ulysses: all n devices exchange heads (n must divide the heads: 12 heads allow 1,2,3,4,6,12).
    ring: all n devices pass blocks around a ring (the queries with a cache, else K/V; `ring.py`).
    hybrid: the largest all-to-all group that divides the heads, times a ring (8 devices, 12 heads:
    4 x 2).
    """
    if n <= 0:
        raise ValueError(f"need at least one sequence device, got {n}")
    if strategy == "ulysses":
        if num_heads % n:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(
                f"all-to-all over {n} devices needs the {num_heads} heads divisible by {n} (possible: "
                f"{divisors}); use strategy='hybrid' (all-to-all x ring) or 'ring' for {n} devices"
            )
        return 1, n
    if strategy == "ring":
        return n, 1
    if strategy == "hybrid":
        u = max(d for d in range(1, n + 1) if n % d == 0 and num_heads % d == 0)
        return n // u, u
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def make_mesh(
    num_devices: int | None = None,
    *,
    num_heads: int,
    strategy: str = "hybrid",
    data: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ('data', 'ring', 'ulysses') mesh over `devices` (default: the first `num_devices` of
    jax.devices(), which spans every process after jax.distributed.initialize).

    num_heads: the model's attention heads (`config.num_heads`), required: the all-to-all group must
    divide them, so the split depends on the model (8 devices: 1 x 8 for 16 heads, 2 x 4 for 12).
    """
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be the model's head count (a positive int), got {num_heads!r}")
    if devices is None:
        all_devices = jax.devices()
        n = num_devices or len(all_devices)
        if n > len(all_devices):
            k, backend = len(all_devices), jax.default_backend()
            hint = (
                f"; to simulate {n} CPU devices, start the process with XLA_FLAGS=--xla_force_host_platform_device_count={n}"
                if backend == "cpu"
                else ""
            )
            raise ValueError(f"asked for {n} devices, only {k} {'is' if k == 1 else 'are'} visible (backend {backend}){hint}")
        devices = all_devices[:n]
    devices = list(devices)
    if num_devices is not None and num_devices != len(devices):
        raise ValueError(f"num_devices={num_devices} but {len(devices)} devices were given")
    if data <= 0 or len(devices) % data:
        raise ValueError(f"{len(devices)} devices cannot be split into data={data} groups")
    ring, ulysses = split_sequence_devices(len(devices) // data, strategy, num_heads)
    grid = np.asarray(devices, dtype=object).reshape(data, ring, ulysses)
    return Mesh(grid, (DATA, RING, ULYSSES), axis_types=(AxisType.Auto,) * 3)


def mesh_sizes(mesh: Mesh) -> tuple[int, int, int]:
    """(data, ring, ulysses) sizes of a mesh made by `make_mesh`."""
    missing = {DATA, RING, ULYSSES} - set(mesh.axis_names)
    if missing:
        raise ValueError(
            f"mesh needs axes {(DATA, RING, ULYSSES)}, missing {sorted(missing)}; build it with sharding.make_mesh"
        )
    return mesh.shape[DATA], mesh.shape[RING], mesh.shape[ULYSSES]
