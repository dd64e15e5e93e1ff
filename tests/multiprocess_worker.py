"""One process of the 2-process test: 4 CPU devices here, joined by jax.distributed into an 8-device
mesh; runs two sharded chunk forwards (the second through the KV cache) and saves the gathered
outputs (process 0). Usage: python multiprocess_worker.py PROCESS_ID PORT STRATEGY OUT.npy"""

import os
import sys

from xla_flags import cpu_flags  # noqa: E402

os.environ["XLA_FLAGS"] = cpu_flags(4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from multiprocess_case import build_case, run_two_chunks  # noqa: E402

from causal_dit_jax.sharding import SequenceParallelDiT, make_mesh  # noqa: E402


def main():
    pid, port, strategy, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    dit, params, text, x, rope = build_case()
    mesh = make_mesh(8, strategy=strategy, num_heads=12)
    replicated = NamedSharding(mesh, P())

    def to_global(a):
        return jax.make_array_from_process_local_data(replicated, np.asarray(a))

    sp = SequenceParallelDiT(dit, mesh)
    outs = run_two_chunks(sp, *jax.tree.map(to_global, (params, text, x, rope)))
    gathered = [np.asarray(multihost_utils.process_allgather(o, tiled=True)) for o in outs]
    if pid == 0:
        np.save(out_path, np.stack(gathered))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
