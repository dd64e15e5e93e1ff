"""Run checkpoints (`RunCheckpoints` on Orbax's CheckpointManager) and the export of trained DiT params."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from causal_dit_jax.checkpoint import CheckpointDirError
from causal_dit_jax.model.config import get_preset
from causal_dit_jax.model.dit import CausalWanDiT, load_dit
from causal_dit_jax.train.checkpoints import RunCheckpoints, export_inference_checkpoint, pack_rng, unpack_rng

REPO = pathlib.Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"
DATA_STATE = {"shard": 3, "offset": 1234, "epoch": 0, "files": ["a.arrayrecord", "b.arrayrecord"]}
CONFIG = {"model": "tiny", "lr": 1e-4, "batch": 8, "betas": [0.9, 0.999], "ema": {"decay": 0.999}}


def make_state(seed: int = 0, step: int = 7):
    """A train state as a run holds it: float32 master params, bf16 EMA, optax state, packed rng, int step."""
    k = jax.random.split(jax.random.key(seed), 3)
    params = {
        "w": jax.random.normal(k[0], (16, 4), jnp.float32),
        "b": jnp.arange(4, dtype=jnp.float32) + seed,
        "emb": jax.random.normal(k[1], (8, 4), jnp.float32).astype(jnp.bfloat16),
    }
    opt_state = optax.adamw(1e-3).init(params)
    return {
        "params": params,
        "ema": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
        "opt_state": opt_state,
        "rng": pack_rng(k[2]),
        "step": step,
    }


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype, (jax.tree_util.keystr(path), x.dtype, y.dtype)
        assert np.array_equal(x, y), jax.tree_util.keystr(path)


def saved_arrays(state):
    """The array leaves of a state, without the Python int step (restored as a 0-d array)."""
    return {k: v for k, v in state.items() if k != "step"}


def tmp_dirs(directory: pathlib.Path):
    return [p.name for p in directory.iterdir() if TMP_SUFFIX in p.name]


def step_dirs(directory: pathlib.Path):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def save(ckpts, step, seed=None, **kw):
    return ckpts.save(step, make_state(step if seed is None else seed, step), {**DATA_STATE, "offset": step}, CONFIG, **kw)


# ---------------------------------------------------------------------------------------------------
# round trip


def test_save_restore_round_trip(tmp_path):
    state = make_state()
    abstract = jax.eval_shape(lambda: state)
    with RunCheckpoints(tmp_path / "run") as ckpts:
        assert ckpts.latest_step() is None and ckpts.all_steps() == []
        assert ckpts.save(7, state, DATA_STATE, CONFIG)
        assert ckpts.latest_step() == 7 and ckpts.all_steps() == [7]
        restored, data_state, config = ckpts.restore(abstract)
    assert_trees_equal(saved_arrays(restored), saved_arrays(state))
    assert int(restored["step"]) == 7
    assert restored["params"]["emb"].dtype == jnp.bfloat16 and restored["ema"]["w"].dtype == jnp.bfloat16
    assert restored["rng"].dtype == jnp.uint32
    assert np.array_equal(jax.random.key_data(unpack_rng(restored["rng"])), jax.random.key_data(unpack_rng(state["rng"])))
    assert data_state == DATA_STATE and config == CONFIG
    # three items in one finished step folder, no temporary folder left
    assert {"state", "data", "config"} <= {p.name for p in (tmp_path / "run" / "7").iterdir()}
    assert tmp_dirs(tmp_path / "run") == [] and step_dirs(tmp_path / "run") == [7]


def test_typed_keys_round_trip(tmp_path):
    """Typed keys (any impl, arrays of keys) are stored as their key data and come back typed."""
    key = jax.random.key(5)
    state = {"rng": key, "rbg": jax.random.key(1, impl="rbg"), "keys": jax.random.split(key, 4), "x": jnp.ones(3)}
    with RunCheckpoints(tmp_path / "run") as ckpts:
        ckpts.save(1, state, {}, {})
        restored, _, _ = ckpts.restore(jax.eval_shape(lambda: state))
        for name in ("rng", "rbg", "keys"):
            assert jax.dtypes.issubdtype(restored[name].dtype, jax.dtypes.prng_key), name
            assert restored[name].dtype == state[name].dtype and restored[name].shape == state[name].shape
            assert np.array_equal(jax.random.key_data(restored[name]), jax.random.key_data(state[name]))
        # the same draws after the restore
        assert np.array_equal(jax.random.normal(restored["rng"], (4,)), jax.random.normal(key, (4,)))
        # on disk it is the raw uint32 key data: a packed abstract state restores it as such
        packed = jax.tree.map(pack_rng, state)
        raw, _, _ = ckpts.restore(jax.eval_shape(lambda: packed))
        assert_trees_equal(raw, packed)


def test_pack_unpack_rng():
    key = jax.random.key(3)
    data = pack_rng(key)
    assert data.dtype == jnp.uint32 and data.shape == (2,)
    assert pack_rng(data) is data  # raw data passes through
    assert np.array_equal(jax.random.key_data(unpack_rng(data)), data)
    rbg = jax.random.key(3, impl="rbg")
    back = unpack_rng(pack_rng(rbg), impl="rbg")
    assert back.dtype == rbg.dtype and np.array_equal(jax.random.key_data(back), jax.random.key_data(rbg))
    with pytest.raises(TypeError, match="uint32"):
        unpack_rng(np.zeros(2, np.int32))


# ---------------------------------------------------------------------------------------------------
# steps: keep, latest, explicit step, resume, save_every


def test_keep_two_latest_and_older_step(tmp_path):
    run = tmp_path / "run"
    with RunCheckpoints(run, keep=2) as ckpts:
        for step in (1, 2, 3, 4):
            assert save(ckpts, step)
        assert ckpts.all_steps() == [3, 4] and ckpts.latest_step() == 4
        assert step_dirs(run) == [3, 4] and tmp_dirs(run) == []
        abstract = jax.eval_shape(lambda: make_state())
        latest, data_state, _ = ckpts.restore(abstract)
        older, older_data, config = ckpts.restore(abstract, step=3)
    assert int(latest["step"]) == 4 and data_state["offset"] == 4
    assert_trees_equal(saved_arrays(latest), saved_arrays(make_state(4, 4)))
    assert int(older["step"]) == 3 and older_data == {**DATA_STATE, "offset": 3} and config == CONFIG
    assert_trees_equal(saved_arrays(older), saved_arrays(make_state(3, 3)))
    with RunCheckpoints(run, keep=2) as ckpts, pytest.raises(FileNotFoundError, match=r"step 1 \(it has steps \[3, 4\]\)"):
        ckpts.restore(abstract, step=1)


def test_resume_from_fresh_object(tmp_path):
    run = tmp_path / "run"
    ckpts = RunCheckpoints(run, keep=2)
    save(ckpts, 10)
    save(ckpts, 20)
    ckpts.close()
    ckpts.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        ckpts.latest_step()

    with RunCheckpoints(run, keep=2) as resumed:  # as a restarted process would
        assert resumed.latest_step() == 20 and resumed.all_steps() == [10, 20]
        state, data_state, config = resumed.restore(jax.eval_shape(lambda: make_state()))
        assert int(state["step"]) == 20 and data_state["offset"] == 20 and config == CONFIG
        assert_trees_equal(saved_arrays(state), saved_arrays(make_state(20, 20)))
        save(resumed, 30)  # carries on; keep still applies across processes
        assert resumed.all_steps() == [20, 30]
    assert step_dirs(run) == [20, 30]


def test_save_every_and_force(tmp_path):
    with RunCheckpoints(tmp_path / "run", save_every=5) as ckpts:
        assert save(ckpts, 5)
        assert not save(ckpts, 6)
        assert save(ckpts, 7, force=True)
        assert save(ckpts, 10)
        assert not save(ckpts, 3)  # not after the latest step
        with pytest.raises(ValueError, match="already has a checkpoint for step 10"):
            save(ckpts, 10, force=True)
        assert ckpts.all_steps() == [5, 7, 10]


# ---------------------------------------------------------------------------------------------------
# sharded restore


def test_restore_onto_sharded_target(tmp_path):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    k = jax.random.split(jax.random.key(0), 3)
    state = {
        "w": jax.random.normal(k[0], (16, 4), jnp.float32),
        "m": jax.random.normal(k[1], (16, 4), jnp.float32).astype(jnp.bfloat16),
        "keys": jax.device_put(jax.random.split(k[2], 8), sharding),  # one key per data shard
        "step": jnp.int32(3),
    }
    with RunCheckpoints(tmp_path / "run") as ckpts:
        ckpts.save(3, state, {}, {})
        abstract = {
            "w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding),
            "m": jax.ShapeDtypeStruct((16, 4), jnp.bfloat16, sharding=sharding),
            "keys": jax.ShapeDtypeStruct((8,), state["keys"].dtype, sharding=sharding),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
        }
        restored, _, _ = ckpts.restore(abstract)
    for name in ("w", "m"):
        x = restored[name]
        assert x.sharding.is_equivalent_to(sharding, 2), name
        assert {s.data.shape for s in x.addressable_shards} == {(2, 4)} and len(x.addressable_shards) == 8
        assert x.dtype == state[name].dtype and np.array_equal(np.asarray(x), np.asarray(state[name]))
    assert restored["keys"].sharding.is_equivalent_to(sharding, 1)
    assert np.array_equal(jax.random.key_data(restored["keys"]), jax.random.key_data(state["keys"]))
    assert int(restored["step"]) == 3


# ---------------------------------------------------------------------------------------------------
# errors


def test_restore_without_checkpoints(tmp_path):
    run = tmp_path / "empty_run"
    with RunCheckpoints(run) as ckpts:
        assert ckpts.latest_step() is None and ckpts.all_steps() == []
        with pytest.raises(FileNotFoundError, match=f"no checkpoints in {run}"):
            ckpts.restore(jax.eval_shape(lambda: make_state()))


def test_directory_is_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a folder")
    with pytest.raises(CheckpointDirError, match=f"{path} exists and is a file"):
        RunCheckpoints(path)


def test_bad_arguments(tmp_path):
    for kw in ({"keep": 0}, {"save_every": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            RunCheckpoints(tmp_path / "run", **kw)
    run = tmp_path / "run"
    with RunCheckpoints(run) as ckpts:
        with pytest.raises(TypeError, match="data_state is not JSON-serialisable"):
            ckpts.save(1, make_state(), {"offset": np.int64(3)}, CONFIG)
        with pytest.raises(TypeError, match="config must be a JSON dict"):
            ckpts.save(1, make_state(), DATA_STATE, "lr=1e-4")
        with pytest.raises(ValueError, match="non-negative int"):
            ckpts.save(-1, make_state(), DATA_STATE, CONFIG)
        assert ckpts.all_steps() == [] and step_dirs(run) == []  # nothing written
        save(ckpts, 1)
        with pytest.raises(ValueError, match=f"{run} step 1: cannot restore the saved state onto abstract_state"):
            ckpts.restore({"params": jax.ShapeDtypeStruct((3,), jnp.float32)})


def test_interrupted_save_leaves_no_step(tmp_path):
    """A process killed at the very end of a save (all data written, rename not done) leaves only a
    temporary folder, which no reader lists and the next RunCheckpoints removes (by its first save)."""
    run = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import os
        import jax.numpy as jnp
        from causal_dit_jax.train.checkpoints import RunCheckpoints

        ckpts = RunCheckpoints({str(run)!r})
        ckpts.save(1, {{"w": jnp.ones((16, 4))}}, {{"offset": 1}}, {{}})
        rename = os.rename

        def killed_before_commit(src, dst, *a, **k):
            if {TMP_SUFFIX!r} in os.fspath(src):
                os._exit(17)  # as a SIGKILL would: no cleanup, no finally
            return rename(src, dst, *a, **k)

        os.rename = killed_before_commit
        ckpts.save(2, {{"w": jnp.full((16, 4), 2.0)}}, {{"offset": 2}}, {{}})
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["XLA_FLAGS"] = ""
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert step_dirs(run) == [1]
    assert [name.split(".")[0] for name in tmp_dirs(run)] == ["2"]  # the half-finished step 2

    with RunCheckpoints(run) as ckpts:
        assert ckpts.all_steps() == [1] and ckpts.latest_step() == 1
        state, data_state, _ = ckpts.restore({"w": jax.ShapeDtypeStruct((16, 4), jnp.float32)})
        assert np.array_equal(state["w"], np.ones((16, 4))) and data_state == {"offset": 1}
        assert ckpts.save(2, {"w": jnp.full((16, 4), 2.0)}, {"offset": 2}, {})  # the step can be written again
        assert ckpts.all_steps() == [1, 2] and tmp_dirs(run) == []  # the leftover is gone by the first save


# ---------------------------------------------------------------------------------------------------
# export for inference


@pytest.fixture(scope="module")
def tiny_params():
    """float32 master weights of the tiny DiT."""
    return CausalWanDiT(get_preset("tiny")).init(jax.random.key(0))


def test_export_round_trip_casts_to_param_dtype(tmp_path, tiny_params):
    config = get_preset("tiny").replace(param_dtype="bfloat16")
    out = export_inference_checkpoint(tiny_params, config, tmp_path / "export")
    assert out == (tmp_path / "export").absolute() and out.is_dir()
    dit, params = load_dit(out)
    assert dit.config == config
    expected = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tiny_params)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert_trees_equal(params, expected)


def test_export_float32_overwrite_and_errors(tmp_path, tiny_params):
    config = get_preset("tiny")
    out = tmp_path / "export"
    export_inference_checkpoint(jax.tree.map(jnp.zeros_like, tiny_params), config, out)
    with pytest.raises(CheckpointDirError, match="already exists"):
        export_inference_checkpoint(tiny_params, config, out)
    export_inference_checkpoint(tiny_params, config, out, overwrite=True)
    _, params = load_dit(out)
    assert_trees_equal(params, tiny_params)  # float32 config: exact

    with pytest.raises(TypeError, match="ModelConfig"):
        export_inference_checkpoint(tiny_params, config.to_dict(), tmp_path / "x")
    with pytest.raises(ValueError, match="parameter tree"):
        export_inference_checkpoint({"stem": tiny_params["stem"]}, config, tmp_path / "x")
    with pytest.raises(ValueError, match="shape"):
        export_inference_checkpoint(tiny_params, config.replace(num_layers=3), tmp_path / "x")
    assert not (tmp_path / "x").exists()
