"""The PyTorch -> Flax DiT converter on real files: key checks, safe loading, checkpoint layouts, dtypes.

Every test builds fresh random weights with `torch_model(seed=...)` and writes them the way the real
checkpoints are written (torch.save pickles, safetensors shards + index + Wan's config.json).
"""

import dataclasses
import functools
import json
import math
import os
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from dit_fixtures import SMALL, torch_model
from safetensors.torch import save_file

from causal_dit_jax import CausalWanDiT
from causal_dit_jax.convert import CheckpointError, dit_convert, dit_params_from_state_dict, load_dit_params, read_state_dict
from causal_dit_jax.convert.dit_convert import torch_dit_shapes
from causal_dit_jax.model.config import ModelConfig

SMALL_BF16 = SMALL.replace(param_dtype="bfloat16", dtype="bfloat16")


@functools.cache
def _cached_state(seed: int) -> dict[str, torch.Tensor]:
    return dict(torch_model(seed=seed).state_dict())


def _state(seed: int) -> dict[str, torch.Tensor]:
    """The state dict of `torch_model(seed)`: fresh copies, safe to edit."""
    return {k: v.clone() for k, v in _cached_state(seed).items()}


def _leaves_with_paths(tree):
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_params_equal(a, b):
    """Same tree, same shapes and dtypes, bit-identical values."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    la, lb = _leaves_with_paths(a), _leaves_with_paths(b)
    for path in la:
        x, y = np.asarray(la[path]), np.asarray(lb[path])
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert np.array_equal(x, y), path


def params_differ(a, b) -> bool:
    la, lb = _leaves_with_paths(a), _leaves_with_paths(b)
    return all(not np.array_equal(np.asarray(la[p]), np.asarray(lb[p])) for p in la)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Seed-0 weights as a plain state-dict .pt and their in-memory conversion."""
    path = tmp_path_factory.mktemp("ref") / "plain.pt"
    torch.save(_state(0), path)
    _, params = load_dit_params(path, SMALL)
    return path, params


# ---------------------------------------------------------------------------------------------------
# key checks


def _error_for(state, tmp_path, name="bad.pt") -> str:
    path = tmp_path / name
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_dit_params(path, SMALL)
    return str(info.value)


def test_missing_key_is_named(tmp_path):
    state = _state(1)
    del state["blocks.1.cross_attn.k.bias"]
    msg = _error_for(state, tmp_path)
    assert "missing keys (1)" in msg and "blocks.1.cross_attn.k.bias" in msg
    assert "unexpected" not in msg and "wrong shapes" not in msg


def test_extra_key_is_named(tmp_path):
    state = _state(1)
    state["blocks.0.self_attn.bogus.weight"] = torch.zeros(3)
    msg = _error_for(state, tmp_path)
    assert "unexpected keys (1)" in msg and "blocks.0.self_attn.bogus.weight" in msg
    assert "missing" not in msg and "wrong shapes" not in msg


def test_wrong_shape_is_named(tmp_path):
    state = _state(1)
    state["blocks.0.ffn.0.weight"] = state["blocks.0.ffn.0.weight"][:255].clone()
    msg = _error_for(state, tmp_path)
    assert "wrong shapes (1)" in msg
    assert "blocks.0.ffn.0.weight: (255, 192) (expected (256, 192))" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_all_problems_reported_in_one_error(tmp_path):
    state = _state(1)
    del state["head.head.bias"]
    del state["blocks.1.self_attn.norm_k.weight"]
    state["blocks.5.ffn.0.weight"] = torch.zeros(256, 192)  # a layer the config does not have
    state["extra_buffer"] = torch.zeros(1)
    state["patch_embedding.weight"] = torch.zeros(192, 16, 1, 2, 3)
    state["blocks.1.modulation"] = torch.zeros(6, 192)
    msg = _error_for(state, tmp_path)
    for key in (
        "head.head.bias",
        "blocks.1.self_attn.norm_k.weight",
        "blocks.5.ffn.0.weight",
        "extra_buffer",
        "patch_embedding.weight",
        "blocks.1.modulation",
    ):
        assert key in msg, key
    assert "missing keys (2)" in msg and "unexpected keys (2)" in msg and "wrong shapes (2)" in msg
    assert "(6, 192) (expected (1, 6, 192))" in msg


def test_in_memory_state_dict_is_checked_too():
    state = {k: v.numpy() for k, v in _state(1).items()}
    del state["time_projection.1.bias"]
    with pytest.raises(CheckpointError, match=r"time_projection\.1\.bias"):
        dit_params_from_state_dict(state, SMALL)


# ---------------------------------------------------------------------------------------------------
# safe loading


class _RunsCode:
    """Unpickling this object would call os.system (creating a marker file)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, fmt):
    import pickle

    marker = tmp_path / "PAYLOAD_RAN"
    payload = {"generator_ema": {"model." + k: v for k, v in _state(2).items()}, "x": _RunsCode(marker)}
    path = tmp_path / "evil.pt"
    if fmt == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_dit_params(path, SMALL)
    msg = str(info.value)
    assert "refusing to load" in msg and "not a plain tensor checkpoint" in msg and str(path) in msg
    assert not marker.exists(), "the pickle payload ran"


def test_non_checkpoint_file_is_refused(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_dit_params(path, SMALL)
    with pytest.raises(CheckpointError, match="not found"):
        load_dit_params(tmp_path / "absent.pt", SMALL)


def test_text_file_named_pt_is_refused_naming_the_file(tmp_path):
    """Text renamed .pt: torch.load's unpickler would fail with 'pop from empty list'; the error names the
    file, what was expected and what it holds."""
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError) as info:
        load_dit_params(path, SMALL)
    msg = str(info.value)
    assert f"cannot read {path}: not a PyTorch checkpoint" in msg and "expected a torch.save file" in msg
    assert "b'these are not" in msg and "pop from empty list" not in msg
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="it is empty"):
        load_dit_params(path, SMALL)


# ---------------------------------------------------------------------------------------------------
# Self-Forcing layouts


def test_generator_ema_is_default_and_generator_selectable(tmp_path, reference):
    ref_path, ema_params = reference  # seed 0
    other = _state(7)
    torch.save(other, tmp_path / "other.pt")
    _, gen_params = load_dit_params(tmp_path / "other.pt", SMALL)
    assert params_differ(ema_params, gen_params)

    sf = tmp_path / "self_forcing.pt"
    torch.save(
        {
            "generator": {"model." + k: v for k, v in other.items()},
            "generator_ema": {"model." + k: v for k, v in _state(0).items()},
            "step": 600,
        },
        sf,
    )
    assert_params_equal(load_dit_params(sf, SMALL)[1], ema_params)
    assert_params_equal(load_dit_params(sf, SMALL, which="generator_ema")[1], ema_params)
    assert_params_equal(load_dit_params(sf, SMALL, which="generator")[1], gen_params)


def test_missing_generator_entry_is_named(tmp_path):
    path = tmp_path / "gen_only.pt"
    torch.save({"generator": {"model." + k: v for k, v in _state(3).items()}}, path)
    with pytest.raises(CheckpointError, match=r"no 'generator_ema' entry; it has \['generator'\]"):
        load_dit_params(path, SMALL)
    load_dit_params(path, SMALL, which="generator")  # and the one that is there loads


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_plain_training_wrappers(tmp_path, reference, wrapper):
    """{'state_dict': sd} / {'model': sd, 'optimizer': ...}: the weights are found with the default `which`."""
    _, ref_params = reference
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper: _state(0), "optimizer": {"lr": 1e-4}}, path)
    assert_params_equal(load_dit_params(path, SMALL)[1], ref_params)


def _wrap_key(key: str, style: str) -> str:
    if style == "plain":
        return key
    if style == "model":
        return "model." + key
    if style == "fsdp":  # FSDP root + nested FSDP / activation-checkpoint wrappers around each block
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            key = f"blocks.{i}._fsdp_wrapped_module._checkpoint_wrapped_module.{rest}"
        return "_fsdp_wrapped_module.model." + key
    if style == "compiled":  # torch.compile'd wrapper
        return "_orig_mod.model._orig_mod." + key
    raise ValueError(style)


@pytest.mark.parametrize("style", ["plain", "model", "fsdp", "compiled"])
def test_key_prefixes_and_infixes_convert_identically(tmp_path, reference, style):
    _, ref_params = reference
    state = {_wrap_key(k, style): v for k, v in _state(0).items()}
    assert style == "plain" or all(k not in state for k in torch_dit_shapes(SMALL))
    path = tmp_path / f"{style}.pt"
    torch.save({"generator": state, "generator_ema": state}, path)
    assert_params_equal(load_dit_params(path, SMALL)[1], ref_params)


def test_keys_colliding_after_stripping_are_refused(tmp_path):
    state = _state(0)
    state["model.head.head.bias"] = state["head.head.bias"].clone()
    path = tmp_path / "dup.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"two checkpoint keys map to 'head\.head\.bias'"):
        load_dit_params(path, SMALL)


# ---------------------------------------------------------------------------------------------------
# sharded safetensors (Wan2.1 Hugging Face layout)

WAN_CONFIG = {
    "_class_name": "WanModel",
    "_diffusers_version": "0.30.0",
    "model_type": "t2v",
    "dim": 192,
    "eps": 1e-6,
    "ffn_dim": 256,
    "freq_dim": 32,
    "in_dim": 16,
    "num_heads": 12,
    "num_layers": 2,
    "out_dim": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": True,
    "cross_attn_norm": True,
    "text_len": 8,
    "window_size": [-1, -1],
}
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _write_sharded(folder: pathlib.Path, state: dict, num_shards: int = 2) -> pathlib.Path:
    folder.mkdir()
    keys = list(state)
    weight_map = {}
    for s in range(num_shards):
        name = f"diffusion_pytorch_model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[s::num_shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(WAN_CONFIG))
    return folder


def test_sharded_safetensors_equal_pt_conversion(tmp_path, reference):
    _, ref_params = reference
    folder = _write_sharded(tmp_path / "Wan2.1-T2V-tiny", _state(0))
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) == 2
    # every shard holds only part of the model
    from safetensors import safe_open

    counts = []
    for f in shards:
        with safe_open(str(f), "np") as h:
            counts.append(len(list(h.keys())))
    assert counts[0] > 0 and counts[1] > 0 and sum(counts) == len(torch_dit_shapes(SMALL))

    # the folder and the index file, with the config given: bit-identical to the .pt conversion
    for src in (folder, folder / INDEX):
        _, params = load_dit_params(src, SMALL)
        assert_params_equal(params, ref_params)

    # with the config inferred from the shapes + Wan's config.json (heads 12 is not dim/128 here)
    cfg, params = load_dit_params(folder / INDEX)
    assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.text_len, cfg.text_dim, cfg.freq_dim, cfg.patch_size) == (
        192,
        256,
        12,
        2,
        8,
        32,
        32,
        (1, 2, 2),
    )
    assert cfg == ModelConfig().replace(
        **{f: getattr(SMALL, f) for f in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "text_len", "freq_dim")}
    )
    assert params["blocks"]["ffn"]["fc1"]["kernel"].dtype == np.dtype(ml_dtypes.bfloat16)  # Wan default
    same_dtype = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), ref_params)
    assert_params_equal(params, same_dtype)


def test_index_naming_a_missing_shard(tmp_path):
    folder = _write_sharded(tmp_path / "wan", _state(0))
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    for src in (folder, folder / INDEX):
        with pytest.raises(CheckpointError) as info:
            load_dit_params(src, SMALL)
        msg = str(info.value)
        assert "do not exist" in msg and "diffusion_pytorch_model-00002-of-00002.safetensors" in msg


def test_index_without_weight_map(tmp_path):
    folder = _write_sharded(tmp_path / "wan", _state(0))
    (folder / INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="no weight_map"):
        load_dit_params(folder, SMALL)


# ---------------------------------------------------------------------------------------------------
# bf16 checkpoints


def _spy_on_transforms(monkeypatch) -> set:
    """Record the dtype of every array the key table's transforms receive and return."""
    seen: set = set()

    def wrap(fn):
        def spied(*arrays):
            seen.update(a.dtype for a in arrays)
            out = fn(*arrays)
            seen.add(out.dtype)
            return out

        return spied

    real = dit_convert.dit_key_map
    monkeypatch.setattr(
        dit_convert,
        "dit_key_map",
        lambda config: tuple(dataclasses.replace(r, transform=wrap(r.transform)) for r in real(config)),
    )
    return seen


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_bf16_checkpoint_converts_exactly_without_float64(tmp_path, monkeypatch, fmt):
    sd = {k: v.to(torch.bfloat16) for k, v in _state(4).items()}  # = torch_model(seed=4).to(torch.bfloat16)
    if fmt == "pt":
        path = tmp_path / "bf16.pt"
        torch.save(
            {"generator": {"model." + k: v for k, v in sd.items()}, "generator_ema": {"model." + k: v for k, v in sd.items()}},
            path,
        )
    else:
        path = tmp_path / "bf16.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))

    state = read_state_dict(path)
    assert {a.dtype for a in state.values()} == {np.dtype(ml_dtypes.bfloat16)}
    for k, v in sd.items():  # bit patterns unchanged by reading
        assert np.array_equal(state[k].view(np.uint16), v.view(torch.int16).numpy().view(np.uint16)), k

    seen = _spy_on_transforms(monkeypatch)
    _, params = load_dit_params(path, SMALL_BF16)
    assert seen == {np.dtype(ml_dtypes.bfloat16)}, seen  # never float32 / float64 on the way
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}

    def f32(key):  # bf16 -> float32 is exact
        return sd[key].float().numpy()

    def eq(ours, want):
        return np.array_equal(np.asarray(ours).astype(np.float32), want)

    blocks, stem, head = params["blocks"], params["stem"], params["head"]
    for i in range(SMALL.num_layers):
        b = f"blocks.{i}."
        assert eq(
            blocks["self_attn"]["qkv"]["kernel"][i], np.concatenate([f32(b + f"self_attn.{n}.weight").T for n in "qkv"], axis=1)
        )
        assert eq(blocks["cross_attn"]["kv"]["bias"][i], np.concatenate([f32(b + f"cross_attn.{n}.bias") for n in "kv"]))
        assert eq(blocks["ffn"]["fc2"]["kernel"][i], f32(b + "ffn.2.weight").T)
        assert eq(blocks["modulation"][i], f32(b + "modulation")[0])
        assert eq(blocks["norm3"]["scale"][i], f32(b + "norm3.weight"))
        assert eq(blocks["cross_attn"]["norm_k"]["scale"][i], f32(b + "cross_attn.norm_k.weight"))
    w = f32("patch_embedding.weight")  # [C_out, C_in, 1, ph, pw] -> [(ph pw C_in), C_out]
    assert eq(stem["patch_embedding"]["kernel"], w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0]))
    assert eq(stem["time_projection"]["kernel"], f32("time_projection.1.weight").T)
    assert eq(head["modulation"], f32("head.modulation")[0])
    assert eq(head["head"]["bias"], f32("head.head.bias"))

    # the whole tree, against the float32 conversion of the same (bf16-representable) values
    upcast = tmp_path / "upcast.pt"
    torch.save({k: v.float() for k, v in sd.items()}, upcast)
    _, ref32 = load_dit_params(upcast, SMALL)
    assert_params_equal(jax.tree.map(lambda a: np.asarray(a).astype(np.float32), params), ref32)
    # and a float32 model from the bf16 file is the exact upcast
    assert_params_equal(load_dit_params(path, SMALL)[1], ref32)


# ---------------------------------------------------------------------------------------------------
# the tree and the real key table


@pytest.mark.parametrize("config", [SMALL, SMALL_BF16], ids=["float32", "bfloat16"])
def test_params_tree_is_exactly_the_model_tree(reference, config):
    path, _ = reference
    _, params = load_dit_params(path, config)
    want = CausalWanDiT(config).abstract_params()
    assert jax.tree.structure(params) == jax.tree.structure(want)
    got = _leaves_with_paths(params)
    for p, a in _leaves_with_paths(want).items():
        assert (got[p].shape, got[p].dtype) == (a.shape, a.dtype), p
        assert isinstance(got[p], jax.Array), p


def test_key_table_matches_the_torch_model():
    sd = torch_model(seed=0).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == torch_dit_shapes(SMALL)


def test_real_1_3b_key_table():
    full = ModelConfig()
    shapes = torch_dit_shapes(full)
    assert len(shapes) == 825
    assert sum(math.prod(s) for s in shapes.values()) == 1_418_996_800
    assert shapes["patch_embedding.weight"] == (1536, 16, 1, 2, 2)
    assert shapes["text_embedding.0.weight"] == (1536, 4096)
    assert shapes["time_projection.1.weight"] == (9216, 1536)
    assert shapes["blocks.29.ffn.0.weight"] == (8960, 1536)
    assert shapes["head.head.weight"] == (64, 1536)
    assert "blocks.30.modulation" not in shapes
    abstract = CausalWanDiT(full).abstract_params()  # shapes only, nothing allocated
    assert sum(a.size for a in jax.tree.leaves(abstract)) == 1_418_996_800


# ---------------------------------------------------------------------------------------------------
# the weight dtype option

F32, BF16 = np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)


def _leaf_dtypes(params) -> set:
    return {np.asarray(a).dtype for a in jax.tree.leaves(params)}


def _to_bf16(params):
    return jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), params)


def _not_bf16_representable(params) -> bool:
    """Some float32 weight that bf16 would round (so the float32 conversion kept more than bf16)."""
    return any(
        not np.array_equal(np.asarray(a), np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32))
        for a in jax.tree.leaves(params)
    )


@pytest.fixture
def inferable_pt(tmp_path, reference):
    """The seed-0 .pt beside Wan's config.json (the head count and text_len are not in the shapes)."""
    path, _ = reference
    pt = tmp_path / "m.pt"
    pt.write_bytes(path.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 12, "text_len": 8}))
    return pt


def test_dtype_float32_of_an_inferred_config(inferable_pt, reference):
    _, ref32 = reference
    cfg16, p16 = load_dit_params(inferable_pt)  # default: Wan's bf16
    assert (cfg16.param_dtype, cfg16.dtype, cfg16.residual_dtype) == ("bfloat16", "bfloat16", "float32")
    assert _leaf_dtypes(p16) == {BF16}
    assert_params_equal(load_dit_params(inferable_pt, dtype="bfloat16")[1], p16)

    cfg32, p32 = load_dit_params(inferable_pt, dtype="float32")
    assert (cfg32.param_dtype, cfg32.dtype, cfg32.residual_dtype) == ("float32", "float32", "float32")
    assert cfg32 == cfg16.replace(param_dtype="float32", dtype="float32")  # nothing else changes
    assert _leaf_dtypes(p32) == {F32}
    assert_params_equal(p32, ref32)  # the exact float32 weights
    assert _not_bf16_representable(p32)
    assert_params_equal(_to_bf16(p32), p16)  # and the bf16 conversion is their bf16 rounding


def test_dtype_overrides_a_given_config_but_not_its_residual(reference):
    path, ref32 = reference
    cfg, p16 = load_dit_params(path, SMALL, dtype="bfloat16")  # SMALL: float32 weights and residual
    assert cfg == SMALL_BF16 and cfg.residual_dtype == "float32"
    assert_params_equal(p16, _to_bf16(ref32))
    assert_params_equal(p16, load_dit_params(path, SMALL_BF16)[1])  # = a hand-built bf16 config
    all_bf16 = SMALL_BF16.replace(residual_dtype="bfloat16")
    cfg, p32 = load_dit_params(path, all_bf16, dtype="float32")
    assert cfg == SMALL.replace(residual_dtype="bfloat16")
    assert_params_equal(p32, ref32)
    assert load_dit_params(path, SMALL)[0] == SMALL  # dtype None: the config's own


@pytest.mark.parametrize("dtype", ["float16", "fp32", "bf16"])
def test_bad_dtype_is_refused_before_reading(tmp_path, dtype):
    from causal_dit_jax.convert import load_t5_params, load_taehv_params, load_vae_params

    for loader in (load_dit_params, load_t5_params, load_vae_params, load_taehv_params):
        with pytest.raises(ValueError, match=rf"unknown weight dtype '{dtype}'; choose one of bfloat16, float32"):
            loader(tmp_path / "absent.pt", dtype=dtype)  # not "checkpoint not found": the dtype comes first


def test_cli_dtype(tmp_path, capsys, inferable_pt):
    from causal_dit_jax.app.cli import main
    from causal_dit_jax.model.dit import load_dit

    src = ["convert", "--checkpoint", str(inferable_pt)]
    assert main(src + ["--out", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    dit, params = load_dit(tmp_path / "f32")
    assert (dit.config.param_dtype, dit.config.dtype, dit.config.residual_dtype) == ("float32",) * 3
    assert _leaf_dtypes(params) == {F32}
    assert_params_equal(params, load_dit_params(inferable_pt, dtype="float32")[1])

    assert main(src + ["--out", str(tmp_path / "bf16")]) == 0  # default
    dit, params = load_dit(tmp_path / "bf16")
    assert (dit.config.param_dtype, dit.config.dtype) == ("bfloat16", "bfloat16")
    assert _leaf_dtypes(params) == {BF16}
    # --dtype also holds over a preset's dtype ('tiny' is a float32 preset)
    assert main(src + ["--out", str(tmp_path / "tiny"), "--preset", "tiny"]) == 0
    assert _leaf_dtypes(load_dit(tmp_path / "tiny")[1]) == {BF16}
    capsys.readouterr()

    with pytest.raises(SystemExit) as info:
        main(src + ["--out", str(tmp_path / "bad"), "--dtype", "float16"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype" in err and "'float16'" in err and "bfloat16" in err and "float32" in err
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------
# all four models: one engine, (config, params) from every loader, bad keys named


def _write_model_files(folder: pathlib.Path) -> dict:
    """A small checkpoint of each model, written the way the real ones are, with the loader's config."""
    from torch_reference import umt5 as ref_t5
    from torch_reference import wan_vae as ref_vae
    from torch_reference.taehv import TAEHVReference

    from causal_dit_jax.autoencoders.taehv import get_taehv_preset
    from causal_dit_jax.autoencoders.wan_vae import get_vae_preset
    from causal_dit_jax.text.umt5 import T5Config

    t5_cfg = T5Config(vocab_size=64, dim=32, dim_attn=48, dim_ffn=64, num_heads=4, num_layers=2)
    t5 = ref_t5.randomize_parameters_(
        ref_t5.T5Encoder(vocab=64, dim=32, dim_attn=48, dim_ffn=64, num_heads=4, num_layers=2), seed=0
    )
    vae_cfg = get_vae_preset("tiny")
    vae = ref_vae.randomize_vae_(ref_vae.WanVAEDecoder(dim=vae_cfg.dim), seed=0)
    taehv_cfg = get_taehv_preset("tiny")
    torch.manual_seed(0)
    taehv = TAEHVReference(
        taehv_cfg.latent_channels, taehv_cfg.channels, taehv_cfg.time_upscale, taehv_cfg.space_upscale, encoder_width=8
    )
    (folder / "config.json").write_text(json.dumps({"num_heads": 12, "text_len": 8}))
    states = {
        "dit": _state(0),
        "t5": t5.state_dict(),
        "taehv": taehv.state_dict(),
        "vae": {**vae.state_dict(), "encoder.conv1.weight": torch.zeros(vae_cfg.dim, 3, 3, 3, 3)},
    }
    files = {}
    for name, state in states.items():
        torch.save({k: v.clone() for k, v in state.items()}, folder / f"{name}.pt")
        files[name] = folder / f"{name}.pt"
    return {"files": files, "states": states, "configs": {"dit": SMALL_BF16, "t5": t5_cfg, "vae": vae_cfg, "taehv": taehv_cfg}}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return _write_model_files(tmp_path_factory.mktemp("models"))


def _loaders():
    from causal_dit_jax.autoencoders.taehv import TAEHVDecoder
    from causal_dit_jax.autoencoders.wan_vae import WanVAE
    from causal_dit_jax.convert import load_t5_params, load_taehv_params, load_vae_params
    from causal_dit_jax.text.umt5 import UMT5Encoder

    # name: (loader, model class, the inferred config's weight dtype)
    return {
        "dit": (load_dit_params, CausalWanDiT, "bfloat16"),
        "t5": (load_t5_params, UMT5Encoder, "bfloat16"),
        "vae": (load_vae_params, WanVAE, "float32"),
        "taehv": (load_taehv_params, TAEHVDecoder, "float32"),
    }


@pytest.mark.parametrize("name", ["dit", "t5", "vae", "taehv"])
def test_every_loader_returns_config_and_params(model_files, name):
    loader, model_cls, default_dtype = _loaders()[name]
    path, want_cfg = model_files["files"][name], model_files["configs"][name]

    result = loader(path)  # config inferred from the file
    assert isinstance(result, tuple) and len(result) == 2
    config, params = result
    assert type(config) is type(want_cfg)
    assert config.param_dtype == config.dtype == default_dtype
    want = model_cls(config).abstract_params()
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for p, a in _leaves_with_paths(want).items():
        leaf = _leaves_with_paths(params)[p]
        assert isinstance(leaf, jax.Array) and (leaf.shape, leaf.dtype) == (a.shape, a.dtype), p

    given = want_cfg.replace(param_dtype=default_dtype, dtype=default_dtype)
    cfg, again = loader(path, given)  # with the config given: that config back, the same params
    assert cfg == given
    assert_params_equal(again, params)

    cfg32, p32 = loader(path, dtype="float32")
    cfg16, p16 = loader(path, dtype="bfloat16")
    assert (cfg32.param_dtype, cfg32.dtype, cfg16.param_dtype, cfg16.dtype) == ("float32",) * 2 + ("bfloat16",) * 2
    assert getattr(cfg32, "residual_dtype", "float32") == getattr(config, "residual_dtype", "float32")
    assert _leaf_dtypes(p32) == {F32} and _leaf_dtypes(p16) == {BF16}
    assert _not_bf16_representable(p32)
    assert_params_equal(_to_bf16(p32), p16)
    assert_params_equal(p32 if default_dtype == "float32" else p16, params)


# each model: a key to drop, one to add, one to truncate (none of them read by the config inference)
BAD_KEYS = {
    "dit": ("blocks.1.ffn.2.bias", "blocks.0.bogus.weight", "head.head.bias"),
    "t5": ("blocks.1.attn.k.weight", "blocks.0.attn.bogus.weight", "norm.weight"),
    "vae": ("decoder.upsamples.7.time_conv.bias", "decoder.bogus.weight", "decoder.head.2.bias"),
    "taehv": ("decoder.10.conv.2.bias", "decoder.bogus.weight", "decoder.22.bias"),
}


@pytest.mark.parametrize("name", ["dit", "t5", "vae", "taehv"])
def test_every_model_file_names_its_bad_keys(model_files, tmp_path, name):
    loader, _, _ = _loaders()[name]
    missing, extra, short = BAD_KEYS[name]
    state = {k: v.clone() for k, v in model_files["states"][name].items()}
    del state[missing]
    state[extra] = torch.zeros(3)
    good_shape = tuple(state[short].shape)
    state[short] = state[short][:-1].clone()
    path = tmp_path / f"bad_{name}.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        loader(path, model_files["configs"][name])
    msg = str(info.value)
    assert f"missing keys (1): {missing}" in msg
    assert f"unexpected keys (1): {extra}" in msg
    assert f"wrong shapes (1): {short}: {(good_shape[0] - 1, *good_shape[1:])} (expected {good_shape})" in msg
    assert "encoder." not in msg  # an ignored half of the file (VAE, TAEHV) is never reported


# ---------------------------------------------------------------------------------------------------
# the engine itself


def test_rule_validates_itself():
    from causal_dit_jax.convert.rules import Rule

    with pytest.raises(ValueError, match="2 keys but 1 shapes"):
        Rule("a/kernel", ("x.weight", "y.weight"), ((3, 4),))
    with pytest.raises(ValueError, match="mixes per-layer and global keys"):
        Rule("a/kernel", ("blocks.{i}.x.weight", "y.weight"), ((3,), (3,)))


def test_table_bugs_are_caught(reference):
    from causal_dit_jax.convert.rules import apply_rules, identity, tensor, torch_shapes

    rules = dit_convert.dit_key_map(SMALL)
    with pytest.raises(AssertionError, match="head.head.bias is read twice"):
        torch_shapes(rules + (tensor("head/extra", "head.head.bias", (16,)),), SMALL.num_layers)
    # a kernel left in torch's [out, in] layout: the tree no longer matches the model's
    broken = tuple(dataclasses.replace(r, transform=identity) if r.ours == "blocks/ffn/fc1/kernel" else r for r in rules)
    state = {k: v.numpy() for k, v in _state(0).items()}
    with pytest.raises(AssertionError, match="produced a different tree"):
        apply_rules(state, broken, CausalWanDiT(SMALL), "the DiT", num_layers=SMALL.num_layers)


def test_consume_releases_the_state_dict_as_it_converts(reference):
    _, ref_params = reference
    state = {k: v.numpy() for k, v in _state(0).items()}
    n = len(state)
    assert_params_equal(dit_params_from_state_dict(state, SMALL), ref_params)
    assert len(state) == n  # untouched by default
    assert_params_equal(dit_params_from_state_dict(state, SMALL, consume=True), ref_params)
    assert state == {}
