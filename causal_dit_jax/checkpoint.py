"""Orbax checkpoints of the converted models: one folder, one sub-checkpoint per model, config.json.

    DIR/config.json    {"format": ..., "components": [...], "dit": {ModelConfig fields}, ...}
    DIR/dit/           Orbax StandardCheckpointer tree of the DiT params
    DIR/<other>/       text encoder, VAE, ... (same scheme)

Writing goes to a hidden temporary folder beside DIR that is renamed into place only when every
part is complete; on any failure it is removed, so no half-written checkpoint is ever left.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

FORMAT = "causal-dit-jax/1"


class CheckpointDirError(ValueError):
    """A checkpoint folder that cannot be written or read; the message says why."""


def check_output_dir(out_dir: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
    """Fail early (before any conversion work) if `out_dir` cannot be created."""
    out = pathlib.Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise CheckpointDirError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    parent = out.parent
    if not parent.exists():
        raise CheckpointDirError(f"parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointDirError(f"parent folder {parent} is not writable")
    return out


@contextlib.contextmanager
def atomic_dir(out_dir: str | pathlib.Path, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary folder; on success it replaces `out_dir`, on error it is deleted."""
    out = check_output_dir(out_dir, overwrite)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(
    out_dir: str | pathlib.Path,
    components: Mapping[str, Any],
    configs: Mapping[str, Any],
    overwrite: bool = False,
    extra_files: Callable[[pathlib.Path], None] | None = None,
) -> pathlib.Path:
    """Write {name: params tree} with Orbax plus config.json, atomically. Returns the folder.

    configs: JSON-able config per component (e.g. {'dit': ModelConfig.to_dict()}).
    extra_files: optional callback that writes more files (tokenizer, ...) into the temporary folder.
    """
    import orbax.checkpoint as ocp

    # Written by the calling process alone (its arrays host or addressable ones): across hosts, the
    # caller is one process (e.g. a training run's process 0 with the gathered weights).
    options = {}
    if jax.process_count() > 1:
        me = jax.process_index()
        options["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"save{me}"
        )
    with atomic_dir(out_dir, overwrite) as tmp:
        ckptr = ocp.StandardCheckpointer(**options)
        for name, tree in components.items():
            ckptr.save(tmp / name, tree)
        ckptr.wait_until_finished()
        ckptr.close()
        if extra_files is not None:
            extra_files(tmp)
        meta = {"format": FORMAT, "components": sorted(components), **configs}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    return pathlib.Path(out_dir).expanduser().absolute()


def read_checkpoint_config(ckpt_dir: str | pathlib.Path) -> dict:
    """config.json of a checkpoint folder, with a clear error when it is not one of ours."""
    d = pathlib.Path(ckpt_dir).expanduser()
    if not d.exists():
        raise CheckpointDirError(f"checkpoint folder {d.absolute()} does not exist")
    if not d.is_dir():
        raise CheckpointDirError(
            f"{d} is a file, not a checkpoint folder; a causal-dit-jax checkpoint is the folder `causal-dit convert` writes"
        )
    f = d / "config.json"
    if not f.exists():
        raise CheckpointDirError(
            f"{d} is not a causal-dit-jax checkpoint (no config.json); convert PyTorch weights with `causal-dit convert`"
        )
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointDirError(f"{f} is not valid JSON ({e}); write the checkpoint again with `causal-dit convert`") from e
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise CheckpointDirError(f"{f}: unknown format {fmt!r} (expected {FORMAT})")
    return meta


def restore_component(
    ckpt_dir: str | pathlib.Path, name: str, abstract_tree: Any, sharding: jax.sharding.Sharding | None = None
) -> Any:
    """Restore one component onto devices; `sharding` (e.g. replicated over a mesh) places it directly."""
    import orbax.checkpoint as ocp

    d = pathlib.Path(ckpt_dir).expanduser().absolute()
    meta = read_checkpoint_config(d)
    if name not in meta["components"] or not (d / name).exists():
        raise CheckpointDirError(f"{d} has no {name!r} model (it has {meta['components']})")
    if sharding is not None:
        abstract_tree = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_tree)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(d / name, abstract_tree)
