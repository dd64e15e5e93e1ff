"""Conversion of PyTorch checkpoints (Self-Forcing `.pt`, Wan2.1 safetensors, umT5, Wan VAE decoder and
encoder, TAEHV) to Flax params / Orbax.

One engine (`rules.py`: the `Rule` type, the key/shape checker, the applier) and one declarative key
table per model (`dit_convert`, `t5_convert`, `vae_convert`, `taehv_convert`). Every loader returns
`(config, params)` and takes `dtype='bfloat16' | 'float32'` (None: the config's own).
"""

from causal_dit_jax.convert.convert_checkpoint import convert_dit_checkpoint
from causal_dit_jax.convert.convert_pipeline import convert_pipeline_checkpoint
from causal_dit_jax.convert.dit_convert import dit_params_from_state_dict, infer_dit_config, load_dit_params
from causal_dit_jax.convert.rules import DTYPES, Rule
from causal_dit_jax.convert.t5_convert import load_t5_params
from causal_dit_jax.convert.taehv_convert import load_taehv_components, load_taehv_encoder_params, load_taehv_params
from causal_dit_jax.convert.torch_files import CheckpointError, read_state_dict
from causal_dit_jax.convert.vae_convert import load_vae_components, load_vae_encoder_params, load_vae_params

__all__ = [
    "convert_dit_checkpoint",
    "convert_pipeline_checkpoint",
    "dit_params_from_state_dict",
    "infer_dit_config",
    "load_dit_params",
    "load_t5_params",
    "load_vae_params",
    "load_vae_encoder_params",
    "load_vae_components",
    "load_taehv_params",
    "load_taehv_encoder_params",
    "load_taehv_components",
    "DTYPES",
    "Rule",
    "CheckpointError",
    "read_state_dict",
]
