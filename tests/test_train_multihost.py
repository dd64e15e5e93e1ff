"""A multi-host training run: 2 processes on 127.0.0.1 with 4 CPU devices each, joined by
jax.distributed into one 8-device data mesh (FSDP-sharded state), each feeding its own data shard as
process-local batches, log the losses of the same run in one process of 8 devices (float32, rtol 1e-5);
and `train.run.train` across the two, stopped after step 2 (Orbax checkpoints from both processes)
and resumed, logs those losses too and exports the EMA weights once."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

HERE = pathlib.Path(__file__).parent
TIMEOUT_S = 900  # 2 processes x (4 Trainer steps + 3 train() calls), compiles included


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_hosts(out: pathlib.Path) -> list[dict]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own 4 devices
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "multihost_train_worker.py"), str(i), port, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs, deadline = [], time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail(f"the 2-process run took over {TIMEOUT_S} s:\n" + _tails(logs))
    if any(p.returncode for p in procs):
        pytest.fail(f"a process failed (exit codes {[p.returncode for p in procs]}):\n" + _tails(logs))
    return [json.loads((out / f"losses_{i}.json").read_text()) for i in range(2)]


def _tails(logs: list[str]) -> str:
    return "\n".join(f"--- process {i} ---\n{log[-6000:]}" for i, log in enumerate(logs))


def test_two_hosts_train_like_one(tmp_path):
    import multihost_train_case as case

    case.write_records(tmp_path / "data")
    hosts = _run_hosts(tmp_path)
    assert hosts[0] == hosts[1]  # the loss is a global (replicated) value: both hosts log the same
    t = case.trainer()
    _, want = case.train_steps(t, case.initial_state(t), case.global_batches(), case.STEPS)
    got = hosts[0]["straight"]
    run = tmp_path / "run"
    logged = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"one process: {want}\ntwo processes: {got}\ntrain() on two, resumed at step 2: {logged}")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # `train` across the hosts: the same batches (each host's shard, its data position restored from
    # process 0's with its own shard index), the same losses after the stop and resume
    np.testing.assert_allclose(logged, got, rtol=1e-6)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    from causal_dit_jax.model.dit import load_dit

    dit, params = load_dit(run / "export")  # written once, by process 0, from the gathered EMA
    assert dit.config == case.CFG and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
