"""Two processes on 127.0.0.1 with 4 CPU devices each, joined by jax.distributed into one 8-device
mesh, give the single-process result for sharded chunk steps (float32, relative error <= 1e-5)."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from multiprocess_case import build_case, run_two_chunks

HERE = pathlib.Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["hybrid", "ring"])
def test_two_processes_equal_one(tmp_path, strategy):
    out = tmp_path / "out.npy"
    port = str(_free_port())
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "multiprocess_worker.py"), str(i), port, strategy, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process run timed out")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    got = np.load(out)
    want = np.stack([np.asarray(o) for o in run_two_chunks(*build_case())])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
