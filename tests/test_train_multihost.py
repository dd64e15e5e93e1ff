"""A multi-host training run: 2 processes on 127.0.0.1 with 4 CPU devices each, joined by
jax.distributed into one 8-device data mesh (FSDP-sharded state), each feeding its own data shard as
process-local batches, log the losses of the same run in one process of 8 devices (float32, rtol 1e-5);
and `train.run.train` across the two, stopped after step 2 (Orbax checkpoints from both processes)
and resumed, logs those losses too and exports the EMA weights once. The distillations across the
two (ODE regression; DMD, stopped after step 1 and resumed) log the losses of the same runs in one
process of 8 devices."""

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
TIMEOUT_S = 900  # one launch of the 2 processes, compiles included


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_hosts(out: pathlib.Path, worker: str = "multihost_train_worker.py") -> list[dict]:
    """Run `worker` as processes 0 and 1 on OUT_DIR `out`: each one's losses_{i}.json. Their output
    goes to out/log_{i}.txt, not a pipe: a pipe not read while the other process is waited on fills
    up (XLA's warnings) and stalls its writer, and with it the other's collectives."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own 4 devices
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    port = str(_free_port())
    logs = [out / f"log_{i}.txt" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with log.open("w") as fh:  # the child holds its own copy of the file
            cmd = [sys.executable, str(HERE / worker), str(i), port, str(out)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"the 2-process run took over {TIMEOUT_S} s:\n" + _tails(logs))
    if any(p.returncode for p in procs):
        pytest.fail(f"a process failed (exit codes {[p.returncode for p in procs]}):\n" + _tails(logs))
    return [json.loads((out / f"losses_{i}.json").read_text()) for i in range(2)]


def _tails(logs: list[pathlib.Path]) -> str:
    return "\n".join(f"--- process {i} ---\n{log.read_text(errors='replace')[-6000:]}" for i, log in enumerate(logs))


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


def _metrics(run: pathlib.Path) -> list[dict]:
    """metrics.jsonl's rows without the timings."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("step_s", "tokens_per_s")} for r in rows]


def test_two_hosts_distil_like_one(tmp_path):
    """ODE regression and DMD by `train.run.train` across the 2 processes (the teacher and critic read
    onto the global mesh, the prompts each host's shard, the noise and negative prompt global arrays;
    DMD stopped after step 1 and resumed): every logged metric equals the same run's in one process
    of 8 devices, reading the same global batches (float32, rtol 1e-5)."""
    import multihost_distill_case as case

    from causal_dit_jax.train.data import TextStateSource, iterate, make_dataset
    from causal_dit_jax.train.run import train

    case.write_inputs(tmp_path)
    one = iterate(make_dataset(TextStateSource(tmp_path / "data_one"), case.GLOBAL_BATCH, case.SEED))
    source, rows = TextStateSource(tmp_path / "data"), case.GLOBAL_BATCH // case.HOSTS
    hosts = [iterate(make_dataset(source, rows, case.SEED, shard_index=h, shard_count=case.HOSTS)) for h in range(case.HOSTS)]
    for _ in range(case.STEPS):  # one process reads the hosts' global batches (each host's rows in process order)
        np.testing.assert_array_equal(next(one)["text"], np.concatenate([next(h)["text"] for h in hosts]))
    got = _run_hosts(tmp_path, "multihost_distill_worker.py")
    assert got[0] == got[1]  # both hosts return the same (global) losses
    assert got[0]["dmd"]["resumed_from"] == case.DMD_STOP_AFTER and got[0]["ode_regression"]["resumed_from"] is None
    for kind in case.KINDS:
        ref = tmp_path / f"one_{kind}"
        train(case.run_config(kind, ref, tmp_path / "data_one", tmp_path), progress=False)
        two, want = _metrics(tmp_path / kind), _metrics(ref)
        print(f"{kind}: one process {want}\ntwo processes {two}")
        assert [r["step"] for r in two] == [r["step"] for r in want] == [1, 2]
        for a, b in zip(two, want):
            assert a.keys() == b.keys()
            np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-5, err_msg=kind)
        saved = ["1", "2"] if kind == "dmd" else ["2"]  # DMD's at its stop
        assert sorted(c.name for c in (tmp_path / kind / "checkpoints").iterdir()) == saved
        assert (tmp_path / kind / "export" / "config.json").is_file()  # written by process 0
