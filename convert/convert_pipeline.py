"""Self-Forcing DiT + a Wan2.1 model folder -> one checkpoint with DiT, umT5, VAE (decoder and encoder) and
the tokenizer.

Wan2.1-T2V-1.3B/
  diffusion_pytorch_model.safetensors (+ config.json)   the base DiT (used when no .pt is given)
  models_t5_umt5-xxl-enc-bf16.pth                        umT5-XXL encoder
  Wan2.1_VAE.pth                                         VAE: decoder ('vae') and encoder ('vae_encoder')
  google/umt5-xxl/                                       tokenizer files
"""

from __future__ import annotations

import pathlib
import shutil

from causal_dit_jax.autoencoders.wan_vae import VAEConfig
from causal_dit_jax.checkpoint import check_output_dir, save_checkpoint
from causal_dit_jax.convert.dit_convert import load_dit_params
from causal_dit_jax.convert.rules import check_dtype
from causal_dit_jax.convert.t5_convert import load_t5_params
from causal_dit_jax.convert.taehv_convert import load_taehv_components
from causal_dit_jax.convert.torch_files import CheckpointError
from causal_dit_jax.convert.vae_convert import load_vae_components
from causal_dit_jax.model.config import ModelConfig
from causal_dit_jax.text.tokenizer import PromptTokenizer
from causal_dit_jax.text.umt5 import T5Config

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = ("google", "umt5-xxl")


def wan_folder_files(wan_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """The T5, VAE and tokenizer paths in a Wan2.1 model folder; one error lists everything missing."""
    d = pathlib.Path(wan_dir).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"Wan model folder not found: {d}")
    files = {"t5": d / T5_FILE, "vae": d / VAE_FILE, "tokenizer": d.joinpath(*TOKENIZER_DIR)}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise CheckpointError(f"{d} is missing: {', '.join(missing)}")
    return files


def convert_pipeline_checkpoint(
    wan_dir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    dit_checkpoint: str | pathlib.Path | None = None,
    dit_config: ModelConfig | None = None,
    which: str = "generator_ema",
    vae_config: VAEConfig | None = None,
    t5_config: T5Config | None = None,
    overwrite: bool = False,
    taehv_checkpoint: str | pathlib.Path | None = None,
    dtype: str | None = None,
) -> pathlib.Path:
    """Convert everything a `TextToVideoPipeline` needs into one Orbax checkpoint folder.

    dit_checkpoint: the Self-Forcing `.pt` (default: the Wan folder's own safetensors DiT).
    taehv_checkpoint: optionally `taew2_1.pth`, the tiny preview decoder (`--decoder taehv`) and, when the
    file has it, its encoder half ('taehv_encoder', `--encoder taehv`).
    dtype: 'bfloat16' or 'float32' for the DiT and the text encoder (the weights Wan ships in bf16);
    None: their configs' own (bfloat16 when inferred). The decoders and the VAE encoder keep their configs'
    dtype (float32). The VAE file's encoder half becomes the 'vae_encoder' component (its config under
    'vae_encoder' in config.json, the decoder's VAEConfig); a decoder-only file gives a checkpoint without it.
    All inputs are read and checked before anything is written; the folder appears complete or not at all.
    """
    check_dtype(dtype)
    check_output_dir(out_dir, overwrite)
    files = wan_folder_files(wan_dir)
    tokenizer_dir = files["tokenizer"]
    PromptTokenizer.from_folder(tokenizer_dir)  # fails now, not after the conversion, if unreadable
    config, dit_params = load_dit_params(dit_checkpoint or wan_dir, dit_config, which, dtype=dtype)
    t5_config, t5_params = load_t5_params(files["t5"], t5_config, dtype=dtype)
    if t5_config.dim != config.text_dim:
        raise CheckpointError(f"text encoder width {t5_config.dim} does not match the DiT's text_dim {config.text_dim}")
    vae_config, vae_components = load_vae_components(files["vae"], vae_config)

    components = {"dit": dit_params, "t5": t5_params, **vae_components}
    configs = {"dit": config.to_dict(), "t5": t5_config.to_dict()} | {name: vae_config.to_dict() for name in vae_components}
    if taehv_checkpoint is not None:
        taehv_config, taehv_components = load_taehv_components(taehv_checkpoint)
        components |= taehv_components
        configs |= {name: taehv_config.to_dict() for name in taehv_components}

    def copy_tokenizer(tmp: pathlib.Path) -> None:
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")

    return save_checkpoint(out_dir, components, configs, overwrite=overwrite, extra_files=copy_tokenizer)
