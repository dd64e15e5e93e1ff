"""One host of the 2-process distillation test: 4 CPU devices here, joined by jax.distributed into one
8-device mesh; runs `train.run.train` of ODE regression (2 steps), then of DMD stopped after step 1
and resumed to step 2, each host reading its own shard of the prompts (process 0 writes the runs'
files); writes the losses `train` returned as JSON.
Usage: python multihost_distill_worker.py PROCESS_ID PORT OUT_DIR"""

import json
import os
import pathlib
import sys

from xla_flags import cpu_flags  # noqa: E402

os.environ["XLA_FLAGS"] = cpu_flags(4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import multihost_distill_case as case  # noqa: E402

# no persistent compilation cache (the test session's, tests/conftest.py): only process 0 writes it,
# so one process can run a cached program where the other compiled its own, and on CPU (gloo) the
# two need not run their collectives in the same order (DMD's: "collective mismatch")
jax.config.update("jax_enable_compilation_cache", False)


def main():
    pid, port, out = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=case.HOSTS, process_id=pid)
    assert jax.device_count() == 8 and jax.local_device_count() == 4 and jax.process_index() == pid
    from causal_dit_jax.train.run import train

    losses = {}
    for kind in case.KINDS:
        config = case.run_config(kind, out / kind, out / "data", out)
        if kind == "dmd":
            first = train(config, progress=False, stop_after=case.DMD_STOP_AFTER)
            assert first["step"] == case.DMD_STOP_AFTER, first
        result = train(config, progress=False)
        assert result["step"] == case.STEPS, result
        losses[kind] = {"loss": result["loss"], "resumed_from": result["resumed_from"]}
    (out / f"losses_{pid}.json").write_text(json.dumps(losses))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
