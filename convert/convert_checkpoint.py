"""PyTorch files -> one Orbax checkpoint folder (see `causal_dit_jax.checkpoint` for the layout)."""

from __future__ import annotations

import pathlib
from typing import Optional

from causal_dit_jax.checkpoint import check_output_dir, save_checkpoint
from causal_dit_jax.model.config import ModelConfig
from causal_dit_jax.convert.dit_convert import load_dit_params


def convert_dit_checkpoint(src: str | pathlib.Path, out_dir: str | pathlib.Path,
                           config: Optional[ModelConfig] = None, which: str = "generator_ema",
                           overwrite: bool = False) -> pathlib.Path:
    """Convert a Self-Forcing `.pt` or Wan2.1 safetensors DiT into an Orbax checkpoint at `out_dir`.

    Every check (output folder, keys, shapes) runs before anything is written; the folder appears
    only when complete.
    """
    check_output_dir(out_dir, overwrite)
    config, params = load_dit_params(src, config, which)
    return save_checkpoint(out_dir, {"dit": params}, {"dit": config.to_dict()}, overwrite=overwrite)
