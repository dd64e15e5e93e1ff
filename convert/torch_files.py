"""Reading PyTorch weight files into numpy, safely.

- `.pt` / `.pth`: `torch.load(weights_only=True)`, which refuses pickles that would run code;
  torch is imported lazily (a conversion-only dependency).
- `.safetensors` (a single file, a folder, or a sharded `*.safetensors.index.json`): read without torch.
bf16 tensors stay bf16 (as `ml_dtypes.bfloat16` numpy arrays).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors.numpy)
import numpy as np

STRIP_PREFIXES = ("model.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the problem."""


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def to_numpy(x) -> np.ndarray:
    """A torch tensor (bf16 stays bf16, bit for bit) or an array-like, as a numpy array."""
    return _torch_to_numpy(x) if hasattr(x, "detach") else np.asarray(x)


def _looks_like_torch_file(path) -> bool:
    """torch.save writes a zip archive (or, in the legacy format, a pickle starting with 0x80)."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            return True
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    except OSError:
        return False


def _not_a_torch_file(path) -> CheckpointError:
    """The error for a file that torch.save did not write, with what it holds instead."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return CheckpointError(f"cannot read {path}: {e}")
    what = "it is empty" if not head else f"it starts with {head!r}"
    return CheckpointError(
        f"cannot read {path}: not a PyTorch checkpoint (expected a torch.save file: a zip "
        f"archive, or a legacy pickle starting with byte 0x80; {what})"
    )


def load_torch_pickle(path: str | pathlib.Path) -> dict:
    """torch.load with weights_only=True; a pickle that would execute code is refused with a clear error."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise CheckpointError(f"reading {path} needs PyTorch: pip install 'causal-dit-jax[convert]'") from e
    import pickle

    p = pathlib.Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not p.is_file():
        raise CheckpointError(f"cannot read {path}: a folder, not a PyTorch checkpoint file")
    # Before torch.load: unpickling text or other bytes fails deep inside pickle ('pop from empty list').
    if not _looks_like_torch_file(p):
        raise _not_a_torch_file(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain tensor checkpoint (unpickling it would run code "
            f"or build objects that weights_only=True forbids). Details: {detail}"
        ) from e
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint not found: {path}") from e
    except Exception as e:  # zip errors, truncated files
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e


def select_state_dict(obj: Mapping, which: str = "generator_ema") -> dict:
    """Pick the model state dict from a Self-Forcing checkpoint ({'generator', 'generator_ema', ...})
    or take a plain state dict as is."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    wrappers = [k for k in ("generator_ema", "generator", "state_dict", "model") if k in obj and isinstance(obj[k], Mapping)]
    if wrappers:
        if which in obj and isinstance(obj[which], Mapping):
            return dict(obj[which])
        if which in ("generator_ema", "generator") and {"generator_ema", "generator"} & set(wrappers):
            raise CheckpointError(f"checkpoint has no {which!r} entry; it has {sorted(wrappers)}")
        return dict(obj[wrappers[0]])
    return dict(obj)


def strip_prefixes(state: Mapping[str, object]) -> dict[str, object]:
    """Drop wrapper prefixes ('model.', FSDP / checkpoint / torch.compile infixes) from every key."""
    out = {}
    for key, value in state.items():
        cleaned = key
        changed = True
        while changed:
            changed = False
            for pre in STRIP_PREFIXES:
                if cleaned.startswith(pre):
                    cleaned = cleaned[len(pre) :]
                    changed = True
        for infix in STRIP_PREFIXES[1:]:
            cleaned = cleaned.replace("." + infix, ".")
        if cleaned in out:
            raise CheckpointError(f"two checkpoint keys map to {cleaned!r} after stripping prefixes")
        out[cleaned] = value
    return out


def read_pt_state_dict(path: str | pathlib.Path, which: str = "generator_ema") -> dict[str, np.ndarray]:
    """A Self-Forcing `.pt` (or any plain PyTorch state dict) as {key: numpy array}, prefixes stripped."""
    obj = load_torch_pickle(path)
    state = strip_prefixes(select_state_dict(obj, which))
    out = {}
    for k, v in state.items():
        if not hasattr(v, "detach"):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = _torch_to_numpy(v)
    return out


def safetensors_files(path: str | pathlib.Path) -> list[pathlib.Path]:
    """The files of a safetensors checkpoint: one file, a sharded index json, or a folder holding either."""
    p = pathlib.Path(path)
    if p.is_dir():
        index = sorted(p.glob("*.safetensors.index.json"))
        if index:
            p = index[0]
        else:
            files = sorted(p.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no .safetensors files in {p}")
            return files
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.name.endswith(".index.json"):
        try:
            weight_map = json.loads(p.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p} is not a safetensors index (no weight_map)") from e
        files = sorted({p.parent / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{p} names shard files that do not exist: {missing}")
        return files
    return [p]


def read_safetensors_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A Wan `diffusion_pytorch_model.safetensors` (single or sharded) as {key: numpy array}; no torch."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in safetensors_files(path):
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {f} as safetensors: {e}") from e
        for k, v in part.items():
            if k in out:
                raise CheckpointError(f"key {k!r} appears in more than one shard ({f})")
            out[k] = v
    return strip_prefixes(out)


def read_state_dict(path: str | pathlib.Path, which: str = "generator_ema") -> dict[str, np.ndarray]:
    """Dispatch on the file type: safetensors (file, index or folder) or a PyTorch pickle."""
    p = pathlib.Path(path)
    if p.is_dir() or p.name.endswith(".safetensors") or p.name.endswith(".index.json"):
        return read_safetensors_state_dict(p)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    return read_pt_state_dict(p, which)
