"""`pallas_out.out_struct`: a Pallas output's declared mesh axes follow its inputs. Under shard_map
(check_vma on) a plain ShapeDtypeStruct is refused; the kernels themselves only run inside shard_map
on GPUs (tests/test_gpu.py), so here the struct is checked where shard_map traces it."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from causal_dit_jax.model.pallas_out import out_struct


def test_out_struct_varies_over_the_axes_of_its_inputs():
    mesh = jax.make_mesh((2,), ("seq",))
    rows = jax.device_put(jnp.arange(8.0).reshape(4, 2), NamedSharding(mesh, P("seq")))
    seen = {}

    def shard(x):
        bias = jnp.ones((2,))  # replicated: varies over no axis
        seen["sharded"] = out_struct((2, 2), jnp.float32, x, bias).manual_axis_type.varying
        seen["replicated"] = out_struct((2,), jnp.float32, bias).manual_axis_type.varying
        return x

    jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=P("seq"), out_specs=P("seq")))(rows)
    assert seen == {"sharded": frozenset({"seq"}), "replicated": frozenset()}
    outside = out_struct((3,), jnp.bfloat16, jnp.zeros(3))
    assert outside.shape == (3,) and outside.dtype == jnp.bfloat16
    assert outside.manual_axis_type.varying == frozenset()
