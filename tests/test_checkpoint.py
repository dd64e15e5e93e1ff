"""Orbax checkpoints written by `convert_dit_checkpoint`: round trip, sharded restore, atomic writes."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from dit_fixtures import LATENT_H, LATENT_W, SMALL, save_self_forcing_pt, torch_model
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import causal_dit_jax.convert.convert_checkpoint as convert_checkpoint_module
from causal_dit_jax.checkpoint import CheckpointDirError, read_checkpoint_config, restore_component, save_checkpoint
from causal_dit_jax.convert import CheckpointError, convert_dit_checkpoint, load_dit_params
from causal_dit_jax.model.dit import CausalWanDiT, load_dit


def assert_params_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x, y), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A Self-Forcing .pt, its Orbax conversion and the in-memory conversion."""
    tmp = tmp_path_factory.mktemp("ckpt")
    pt = save_self_forcing_pt(torch_model(seed=21), tmp / "self_forcing.pt")
    out = convert_dit_checkpoint(pt, tmp / "converted", SMALL)
    _, params = load_dit_params(pt, SMALL)
    return pt, out, params


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def _partials(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name]


# ---------------------------------------------------------------------------------------------------
# round trip


def test_convert_then_load_round_trip(converted):
    pt, out, params = converted
    assert out.is_absolute() and out.is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dit"]
    meta = read_checkpoint_config(out)
    assert meta["components"] == ["dit"] and meta["dit"] == json.loads(json.dumps(SMALL.to_dict()))
    assert not _partials(out.parent)

    dit, restored = load_dit(out)
    assert dit.config == SMALL
    assert_params_equal(restored, params)

    key = jax.random.key(3)
    x = jax.random.normal(key, (1, 3, LATENT_H, LATENT_W, SMALL.in_dim))
    t = jax.random.uniform(jax.random.fold_in(key, 1), (1, 3)) * 1000
    ctx = jax.random.normal(jax.random.fold_in(key, 2), (1, SMALL.text_len, SMALL.text_dim))
    rope = dit.rope_tables(3, LATENT_H, LATENT_W)

    @jax.jit
    def run(p):
        return dit.forward(p, x, t, dit.encode_text(p, ctx), None, 0, rope)[0]

    # same placement as the restored arrays (committed), so both calls share one compilation
    placed = jax.tree.map(lambda a, r: jax.device_put(a, r.sharding), params, restored)
    ours, ref = np.asarray(run(restored)), np.asarray(run(placed))
    assert ours.shape == (1, 3, LATENT_H, LATENT_W, SMALL.out_dim)
    assert np.all(np.isfinite(ref)) and np.abs(ref).max() > 0
    assert np.array_equal(ours, ref)


def test_restore_with_replicated_sharding(converted):
    _, out, params = converted
    assert jax.device_count() == 8  # conftest's simulated CPU devices
    mesh = jax.make_mesh((8,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P())
    dit, restored = load_dit(out, sharding=sharding)
    assert dit.config == SMALL
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
        assert isinstance(leaf, jax.Array), jax.tree_util.keystr(path)
        assert leaf.sharding == sharding, (jax.tree_util.keystr(path), leaf.sharding)
        assert len(leaf.sharding.device_set) == 8
        # every device holds the full array
        assert all(s.data.shape == leaf.shape for s in leaf.addressable_shards)
    assert_params_equal(restored, params)


def test_bf16_model_round_trip(tmp_path, converted):
    pt, _, _ = converted
    cfg = SMALL.replace(param_dtype="bfloat16", dtype="bfloat16")
    out = convert_dit_checkpoint(pt, tmp_path / "bf16", cfg)
    dit, restored = load_dit(out)
    assert dit.config == cfg
    assert {a.dtype for a in jax.tree.leaves(restored)} == {jnp.dtype(jnp.bfloat16)}
    assert_params_equal(restored, load_dit_params(pt, cfg)[1])


def test_dtype_option_round_trip(tmp_path, converted):
    """dtype='bfloat16' on a float32 config = the hand-built bf16 config (residual stream kept float32)."""
    pt, _, params = converted
    out = convert_dit_checkpoint(pt, tmp_path / "bf16", SMALL, dtype="bfloat16")
    dit, restored = load_dit(out)
    assert dit.config == SMALL.replace(param_dtype="bfloat16", dtype="bfloat16")
    assert dit.config.residual_dtype == "float32"
    assert_params_equal(restored, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    out = convert_dit_checkpoint(pt, tmp_path / "f32", dit.config, dtype="float32")
    dit, restored = load_dit(out)
    assert dit.config == SMALL
    assert_params_equal(restored, params)


# ---------------------------------------------------------------------------------------------------
# atomic writes and clear errors


def test_failed_conversion_leaves_nothing(tmp_path):
    sd = {k: v.clone() for k, v in torch_model(seed=22).state_dict().items()}
    del sd["blocks.0.self_attn.q.weight"]
    pt = tmp_path / "broken.pt"
    torch.save(sd, pt)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(CheckpointError, match=r"blocks\.0\.self_attn\.q\.weight"):
        convert_dit_checkpoint(pt, work / "out", SMALL)
    assert _listing(work) == []  # no out dir, no hidden .out.partial-* folder


def test_failure_while_writing_leaves_nothing_and_keeps_old(tmp_path, converted):
    _, _, params = converted

    def boom(tmp):
        assert tmp.name.startswith(".out.partial-") and (tmp / "dit").is_dir()  # written into the temp dir
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "out", {"dit": params}, {"dit": SMALL.to_dict()}, extra_files=boom)
    assert _listing(tmp_path) == []

    # a failed overwrite keeps the old checkpoint as it was
    old = save_checkpoint(tmp_path / "out", {"dit": params}, {"dit": SMALL.to_dict()})
    before = sorted(str(p.relative_to(old)) for p in old.rglob("*"))
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(old, {"dit": params}, {"dit": SMALL.to_dict()}, overwrite=True, extra_files=boom)
    assert _listing(tmp_path) == ["out"]
    assert sorted(str(p.relative_to(old)) for p in old.rglob("*")) == before
    assert_params_equal(load_dit(old)[1], params)


def test_existing_out_dir_refused_then_overwritten(tmp_path, converted):
    pt, _, params = converted
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointDirError, match="already exists"):
        convert_dit_checkpoint(pt, out, SMALL)
    assert _listing(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"
    assert _listing(tmp_path) == ["out"]

    assert convert_dit_checkpoint(pt, out, SMALL, overwrite=True) == out
    assert _listing(out) == ["config.json", "dit"]
    assert _listing(tmp_path) == ["out"]
    assert_params_equal(load_dit(out)[1], params)


@pytest.fixture
def no_conversion_work(monkeypatch):
    """Fail the test if the converter starts reading the checkpoint."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("conversion work started before the output folder was checked")

    monkeypatch.setattr(convert_checkpoint_module, "load_dit_params", spy)
    return calls


def test_nonexistent_parent_refused_before_any_work(tmp_path, converted, no_conversion_work):
    pt, _, _ = converted
    out = tmp_path / "no" / "such" / "out"
    with pytest.raises(CheckpointDirError, match="does not exist"):
        convert_dit_checkpoint(pt, out, SMALL)
    assert no_conversion_work == [] and not (tmp_path / "no").exists()
    with pytest.raises(CheckpointDirError, match="already exists"):  # existing out, also before any work
        convert_dit_checkpoint(pt, tmp_path, SMALL)
    assert no_conversion_work == []


def test_bad_dtype_refused_before_any_work(tmp_path, converted, no_conversion_work):
    pt, _, _ = converted
    with pytest.raises(ValueError, match="unknown weight dtype 'float16'; choose one of bfloat16, float32"):
        convert_dit_checkpoint(pt, tmp_path / "no" / "such" / "out", SMALL, dtype="float16")  # before the folder
    assert no_conversion_work == [] and list(tmp_path.iterdir()) == []


def test_unwritable_parent_refused_before_any_work(tmp_path, converted, no_conversion_work, monkeypatch):
    pt, _, _ = converted
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # root ignores mode bits: simulate what access() says for others
            real_access = os.access
            monkeypatch.setattr(
                os,
                "access",
                lambda p, mode, *a, **k: (
                    False if (mode & os.W_OK and os.fspath(p) == os.fspath(parent)) else real_access(p, mode, *a, **k)
                ),
            )
        with pytest.raises(CheckpointDirError, match="not writable"):
            convert_dit_checkpoint(pt, parent / "out", SMALL)
        assert no_conversion_work == [] and _listing(parent) == []
    finally:
        parent.chmod(0o755)


def test_load_dit_without_config_json(tmp_path, converted):
    with pytest.raises(CheckpointDirError, match="no config.json"):
        load_dit(tmp_path)
    # an Orbax tree alone (config.json lost) is not accepted either
    _, out, _ = converted
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointDirError, match="is not a causal-dit-jax checkpoint"):
        load_dit(copy)


def test_unknown_format_refused(tmp_path, converted):
    _, out, _ = converted
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**meta, "format": "something-else/9"}))
    with pytest.raises(CheckpointDirError, match="unknown format 'something-else/9'"):
        load_dit(copy)


def test_restore_missing_component_names_it(tmp_path, converted):
    _, out, _ = converted
    abstract = CausalWanDiT(SMALL).abstract_params()
    with pytest.raises(CheckpointDirError, match=r"has no 'vae' model \(it has \['dit'\]\)"):
        restore_component(out, "vae", abstract)
    # listed in config.json but its folder is gone
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "dit")
    with pytest.raises(CheckpointDirError, match="has no 'dit' model"):
        load_dit(copy)


def test_read_checkpoint_config_says_what_is_wrong(tmp_path):
    """A missing folder, a file, a folder without config.json, a config.json that is not JSON (named)."""
    with pytest.raises(CheckpointDirError, match=r"checkpoint folder .*/absent does not exist"):
        read_checkpoint_config(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointDirError, match="is a file, not a checkpoint folder"):
        read_checkpoint_config(tmp_path / "file")
    with pytest.raises(CheckpointDirError, match=r"not a causal-dit-jax checkpoint \(no config\.json\)"):
        read_checkpoint_config(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "causal-dit-jax/1",')
    with pytest.raises(CheckpointDirError, match=f"{tmp_path / 'config.json'} is not valid JSON"):
        read_checkpoint_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointDirError, match="unknown format None"):
        read_checkpoint_config(tmp_path)
