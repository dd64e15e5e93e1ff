"""Parameter trees as one .npz file: small models shipped inside the package, or handed between jobs.

Leaves are stored under their tree paths (`jax.tree_util.keystr`), in their own dtype or a given one;
bfloat16 (which .npz cannot name) is stored as its uint16 bit pattern with the dtype recorded beside.
Loading maps the file back onto an abstract tree (e.g. a model's `abstract_params()`), refusing a
missing, extra or reshaped leaf by name. Files are written whole, then moved into place.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import ml_dtypes
import numpy as np

_DTYPES_KEY = "__dtypes__"


def _flat(tree: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def save_params(path: str | pathlib.Path, tree: Any, dtype: str | None = None) -> pathlib.Path:
    """Write `tree`'s leaves (cast to `dtype` when given, e.g. 'bfloat16') to `path` (.npz)."""
    path = pathlib.Path(path)
    arrays, dtypes = {}, {}
    for name, leaf in _flat(tree).items():
        a = np.asarray(jax.device_get(leaf))
        if dtype is not None:
            a = a.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))
        dtypes[name] = str(a.dtype)
        arrays[name] = a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a
    arrays[_DTYPES_KEY] = np.frombuffer(json.dumps(dtypes).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
    return path


def load_params(path: str | pathlib.Path, abstract: Any) -> Any:
    """The tree of `abstract`'s structure (its leaves' shapes; any dtypes) from `path`, as numpy arrays
    in the stored dtypes (bfloat16 restored)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter file {path} does not exist")
    with np.load(path) as f:
        dtypes = json.loads(bytes(f[_DTYPES_KEY]).decode())
        stored = {k: f[k] for k in f.files if k != _DTYPES_KEY}
    want = _flat(abstract)
    missing, extra = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
    if missing or extra:
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    leaves = []
    for name, ref in want.items():
        a = stored[name]
        if dtypes[name] == "bfloat16":
            a = a.view(ml_dtypes.bfloat16)
        if tuple(a.shape) != tuple(ref.shape):
            raise ValueError(f"{path}: {name} has shape {a.shape}, the model wants {tuple(ref.shape)}")
        leaves.append(a)
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


__all__ = ["load_params", "save_params"]
