"""One host of the 2-process training test: 4 CPU devices here, joined by jax.distributed into one
8-device mesh; trains on its own shard of the data (process-local batches) 4 steps straight with the
library's Trainer, then runs `train.run.train` on the same data: stopped after step 2 (a checkpoint),
then resumed to step 4; writes the Trainer's losses as JSON (process 0 writes the run's files).
Usage: python multihost_train_worker.py PROCESS_ID PORT OUT_DIR"""

import json
import os
import pathlib
import sys

from xla_flags import cpu_flags  # noqa: E402

os.environ["XLA_FLAGS"] = cpu_flags(4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import multihost_train_case as case  # noqa: E402


def main():
    pid, port, out = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
    # cross-process CPU collectives: gloo, the default of jax_cpu_collectives_implementation
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=case.HOSTS, process_id=pid)
    assert jax.device_count() == 8 and jax.local_device_count() == 4 and jax.process_index() == pid
    from causal_dit_jax.train.run import train

    t = case.trainer()
    _, straight = case.train_steps(t, case.initial_state(t), case.host_batches(pid), case.STEPS)
    config = case.run_config(out / "run", out / "data")
    first = train(config, progress=False, stop_after=2)
    second = train(config, progress=False)
    assert (first["step"], second["step"], second["resumed_from"]) == (2, 4, 2), (first, second)
    (out / f"losses_{pid}.json").write_text(json.dumps({"straight": straight}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
