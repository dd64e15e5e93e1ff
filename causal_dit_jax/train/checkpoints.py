"""Checkpoints of a training run, on Orbax's `CheckpointManager`, and the export of trained DiT params.

    DIR/<step>/state/     Orbax StandardSave tree: {"params", "ema", "opt_state", "rng", "step", ...}
    DIR/<step>/data/      JSON: the data iterator's state (to resume the data stream where it stopped)
    DIR/<step>/config/    JSON: the run config

Each step is written by Orbax into a temporary folder (`<step>.orbax-checkpoint-tmp*`) that is renamed
to `<step>` only when complete; `save` waits for that, so a process killed mid-save never leaves a
half-written step that `all_steps` / `restore` would see (the next `RunCheckpoints` on the directory
removes leftover temporary folders, in the background, done by its first save). Only the last `keep`
steps are kept.

PRNG keys: typed keys (`jax.random.key`) in the state are saved as their raw `jax.random.key_data`
(uint32) and re-wrapped on restore when the abstract state holds a typed key; a state may equally hold
the raw data itself (`pack_rng` / `unpack_rng`).

`export_inference_checkpoint` writes trained DiT params as the checkpoint folder `load_dit` reads.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from causal_dit_jax.checkpoint import CheckpointDirError, save_checkpoint
from causal_dit_jax.model.config import ModelConfig

ITEMS = ("state", "data", "config")


# --------------------------------------------------------------------------------------------- PRNG keys
def _is_typed_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def pack_rng(key: jax.Array) -> jax.Array:
    """Typed PRNG key(s) -> their raw uint32 key data (what a checkpoint stores); raw data passes through."""
    return jax.random.key_data(key) if _is_typed_key(key) else key


def unpack_rng(data, impl: str | None = None) -> jax.Array:
    """Raw uint32 key data (from `pack_rng`) -> a typed key of `impl` (default: JAX's default PRNG)."""
    data = jnp.asarray(data)
    if data.dtype != jnp.uint32:
        raise TypeError(f"PRNG key data must be uint32 (from pack_rng), got {data.dtype}")
    return jax.random.wrap_key_data(data, impl=impl)


def _key_impl(abstract_key: jax.ShapeDtypeStruct):
    """The PRNG implementation of an abstract typed key (public API only: trace it once)."""
    found = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)) or 0, abstract_key)
    return found[0]


def _abstract_leaf(x):
    """Concrete arrays -> ShapeDtypeStruct (keeping their sharding); abstract leaves and scalars as they are."""
    if isinstance(x, (jax.Array, np.ndarray)):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return x


def _packed_abstract(x):
    """Abstract typed key -> the ShapeDtypeStruct of its key data, with the same sharding."""
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))


def _check_json(name: str, value) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a JSON dict, got {type(value).__name__}")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} is not JSON-serialisable ({e}); convert numpy / jax values to Python types") from e
    return value


# --------------------------------------------------------------------------------------------- run checkpoints
class RunCheckpoints:
    """The checkpoints of one training run in `directory` (created if missing): one folder per step.

    keep: how many of the latest steps to keep (older ones are deleted after each save).
    save_every: `save(step)` writes when step % save_every == 0 (None: 1, every step it is called for),
    and also (Orbax's default policy) the first save into an empty directory and at a preemption sync
    point; a step not after the latest is skipped. `force=True` writes a new step regardless.
    Use as a context manager, or call `close()`.
    """

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, save_every: int | None = None):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
            raise ValueError(f"save_every must be a positive int or None, got {save_every!r}")
        self.directory = pathlib.Path(directory).expanduser().absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointDirError(f"checkpoint directory {self.directory} exists and is a file, not a folder")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_every or 1,
            create=True,
            cleanup_tmp_directories=True,  # the temporary folders of a save that was killed
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._closed = False

    def _open(self) -> ocp.CheckpointManager:
        if self._closed:
            raise RuntimeError(f"RunCheckpoints({self.directory}) is closed")
        return self._manager

    def save(self, step: int, state: Any, data_state: dict, config: dict, *, force: bool = False) -> bool:
        """Write `state` (pytree of arrays), `data_state` and `config` (JSON dicts) as `step`; return
        whether it was written (see save_every / force). Returns only when the step is complete on disk."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        _check_json("data_state", data_state)
        _check_json("config", config)
        manager = self._open()
        if force and step in manager.all_steps():
            raise ValueError(f"{self.directory} already has a checkpoint for step {step}; it is not overwritten")
        state = jax.tree.map(pack_rng, state)
        saved = manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)
            ),
            force=force,
        )
        manager.wait_until_finished()
        return bool(saved)

    def all_steps(self) -> list[int]:
        """The finished steps in the directory, oldest first."""
        return sorted(self._open().all_steps())

    def latest_step(self) -> int | None:
        """The newest finished step, or None when there is none."""
        return self._open().latest_step()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data_state, config) of `step` (default: the latest).

        abstract_state: the state's pytree of `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape` of the state
        initialiser); each leaf's `.sharding` (e.g. a `NamedSharding` over the mesh) places the restored
        array directly. Concrete arrays are taken as their shape/dtype/sharding.
        """
        manager = self._open()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoints in {self.directory} to restore")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"{self.directory} has no checkpoint for step {step} (it has steps {steps})")
        abstract = jax.tree.map(_abstract_leaf, abstract_state)
        target = jax.tree.map(lambda x: _packed_abstract(x) if _is_typed_key(x) else x, abstract)
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()
                ),
            )
        except ValueError as e:
            raise ValueError(f"{self.directory} step {step}: cannot restore the saved state onto abstract_state: {e}") from e
        state = jax.tree.map(
            lambda a, x: jax.random.wrap_key_data(x, impl=_key_impl(a)) if _is_typed_key(a) else x, abstract, restored.state
        )
        return state, restored.data, restored.config

    def close(self) -> None:
        """Wait for pending work and release the manager (idempotent)."""
        if not self._closed:
            self._manager.close()
            self._closed = True

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunCheckpoints({str(self.directory)!r})"


# --------------------------------------------------------------------------------------------- export
def export_inference_checkpoint(
    params: Any, dit_config: ModelConfig, out_dir: str | pathlib.Path, overwrite: bool = False
) -> pathlib.Path:
    """Write DiT params as an inference checkpoint folder (what `load_dit` / `causal-dit` read).

    params: the DiT's params tree (bfloat16 layout, e.g. the EMA weights); each leaf is cast to the
    config's `param_dtype` (a run may hold float32 master weights). Returns the folder.
    """
    from causal_dit_jax.model.dit import CausalWanDiT

    if not isinstance(dit_config, ModelConfig):
        raise TypeError(f"dit_config must be a ModelConfig, got {type(dit_config).__name__}")
    expected = CausalWanDiT(dit_config).abstract_params()
    if jax.tree.structure(params) != jax.tree.structure(expected):
        raise ValueError(
            "params do not have the DiT's parameter tree for this config (float8-quantised or other params?):\n"
            f"  got      {jax.tree.structure(params)}\n  expected {jax.tree.structure(expected)}"
        )
    for (path, x), e in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
        if tuple(np.shape(x)) != e.shape:
            raise ValueError(f"param {jax.tree_util.keystr(path)} has shape {tuple(np.shape(x))}, the config says {e.shape}")
    if jax.process_count() == 1:
        cast = jax.tree.map(lambda x, e: jnp.asarray(x, e.dtype), params, expected)
    else:  # one process of several writes host arrays (Orbax refuses process-local jax.Arrays there)
        cast = jax.tree.map(lambda x, e: np.asarray(x).astype(e.dtype), params, expected)
    return save_checkpoint(out_dir, {"dit": cast}, {"dit": dit_config.to_dict()}, overwrite=overwrite)
