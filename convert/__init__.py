"""Conversion of PyTorch checkpoints (Self-Forcing `.pt`, Wan2.1 safetensors) to Flax params / Orbax."""

from causal_dit_jax.convert.convert_checkpoint import convert_dit_checkpoint
from causal_dit_jax.convert.convert_pipeline import convert_pipeline_checkpoint
from causal_dit_jax.convert.dit_convert import dit_params_from_state_dict, infer_dit_config, load_dit_params
from causal_dit_jax.convert.torch_files import CheckpointError, read_state_dict

__all__ = ["convert_dit_checkpoint", "convert_pipeline_checkpoint", "dit_params_from_state_dict", "infer_dit_config",
           "load_dit_params", "CheckpointError", "read_state_dict"]
