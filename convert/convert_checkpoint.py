"""PyTorch files -> one Orbax checkpoint folder (see `causal_dit_jax.checkpoint` for the layout)."""

from __future__ import annotations

import pathlib

from causal_dit_jax.checkpoint import check_output_dir, save_checkpoint
from causal_dit_jax.convert.dit_convert import load_dit_params
from causal_dit_jax.convert.rules import check_dtype
from causal_dit_jax.model.config import ModelConfig


def convert_dit_checkpoint(
    src: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    config: ModelConfig | None = None,
    which: str = "generator_ema",
    overwrite: bool = False,
    dtype: str | None = None,
) -> pathlib.Path:
    """Convert a Self-Forcing `.pt` or Wan2.1 safetensors DiT into an Orbax checkpoint at `out_dir`.

    dtype: 'bfloat16' or 'float32' weights (None: the config's, bfloat16 when inferred); see
    `load_dit_params`. Every check (dtype, output folder, keys, shapes) runs before anything is written;
    the folder appears only when complete.
    """
    check_dtype(dtype)
    check_output_dir(out_dir, overwrite)
    config, params = load_dit_params(src, config, which, dtype=dtype)
    return save_checkpoint(out_dir, {"dit": params}, {"dit": config.to_dict()}, overwrite=overwrite)
