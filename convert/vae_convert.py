"""`Wan2.1_VAE.pth` (a plain PyTorch state dict) -> our VAE decoder params, checked key by key.

Only the decoder half is read (`conv2.*`, `decoder.*`); the encoder half (`encoder.*`, `conv1.*`) is
expected in the file and ignored. Any other key, a missing decoder key or a tensor of the wrong shape
is reported by name in one `CheckpointError`.
"""

from __future__ import annotations

import pathlib
from typing import Mapping, Optional

import numpy as np

from causal_dit_jax.model.config import dtype_from_name
from causal_dit_jax.decoders.wan_vae import Params, VAEConfig, WanVAE, get_vae_preset
from causal_dit_jax.convert.state_dict_check import check_keys_and_shapes, params_from_rules
from causal_dit_jax.convert.torch_files import load_torch_pickle, select_state_dict
from causal_dit_jax.convert.vae_keys import IGNORED_PREFIXES, vae_decoder_key_map


def check_vae_state_dict(state: Mapping[str, object], config: VAEConfig) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped decoder key
    (the encoder half of the file is ignored)."""
    expected = {rule.torch: rule.torch_shape for rule in vae_decoder_key_map(config)}
    decoder_part = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    check_keys_and_shapes(decoder_part, expected, f"the VAE decoder config (dim={config.dim}, "
                          f"dim_mult={config.dim_mult}, num_res_blocks={config.num_res_blocks})")


def vae_params_from_state_dict(state: Mapping[str, object], config: VAEConfig) -> Params:
    """Map a Wan VAE state dict (torch tensors or numpy arrays) onto our decoder params tree."""
    check_vae_state_dict(state, config)
    return params_from_rules(state, vae_decoder_key_map(config), np.dtype(dtype_from_name(config.param_dtype)),
                             WanVAE(config).abstract_params(), "VAE")


def load_vae_params(path: str | pathlib.Path, config: Optional[VAEConfig] = None) -> Params:
    """Read `Wan2.1_VAE.pth` (torch.load weights_only=True) and return the decoder params for `config`
    (default: the 'wan2.1' preset at the width read off `decoder.conv1.weight`), in config.param_dtype."""
    state = select_state_dict(load_torch_pickle(path))
    if config is None:
        config = get_vae_preset("wan2.1")
        conv1 = state.get("decoder.conv1.weight")
        if conv1 is not None and conv1.shape[0] % config.dim_mult[-1] == 0:
            config = config.replace(dim=int(conv1.shape[0]) // config.dim_mult[-1])
    return vae_params_from_state_dict(state, config)
