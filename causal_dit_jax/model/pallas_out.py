"""Output structs for `pallas_call` that also hold inside `jax.shard_map`.

Under shard_map (check_vma on, the default) a Pallas call must say over which mesh axes each output
varies; a plain `jax.ShapeDtypeStruct` is refused there. `out_struct` gives the output the axes its
inputs vary over (a token-sharded input makes token-sharded outputs); outside shard_map there are none.
"""

from __future__ import annotations

import jax


def out_struct(shape, dtype, *inputs: jax.Array) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct(shape, dtype) varying over the union of the mesh axes `inputs` vary over."""
    mats = [jax.typeof(x).mat for x in inputs]
    varying = frozenset().union(*(m.varying for m in mats))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mats[0].update(varying=varying))


__all__ = ["out_struct"]
