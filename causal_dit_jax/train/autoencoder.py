"""Training a Wan-architecture VAE as an autoencoder, and the latent statistics it is then used with.

The encoder's posterior (raw mean and log-variance, `WanVAEEncoder.moments`) is sampled with the
reparameterisation trick, decoded unclipped (`WanVAE.decode_raw`) and scored against the input clip
with L1 + MSE, plus a small KL term towards N(0, 1) (Wan's VAE objective, without its perceptual and
adversarial terms). The trained VAE's per-channel latent mean and std (`latent_statistics`) go into
its `VAEConfig`, so that the encoder hands the DiT unit-scale latents and the decoder undoes it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.autoencoders.wan_vae import VAEConfig, WanVAE
from causal_dit_jax.autoencoders.wan_vae_encoder import WanVAEEncoder
from causal_dit_jax.model.config import ConfigFields
from causal_dit_jax.model.dit import Params


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(ConfigFields):
    """The reconstruction loss: l1_weight * |x - x'| + mse_weight * (x - x')^2 (means over pixels) +
    kl_weight * KL(q(z | x) || N(0, 1)) (mean over latent elements); sample_posterior: decode a draw
    of the posterior (False: its mean, a plain autoencoder)."""

    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-4
    sample_posterior: bool = True

    def __post_init__(self):
        if min(self.l1_weight, self.mse_weight, self.kl_weight) < 0:
            raise ValueError(f"loss weights must be >= 0, got {self.l1_weight}, {self.mse_weight}, {self.kl_weight}")


class AutoencoderObjective:
    """The VAE's loss as a pure function of (params {'encoder', 'decoder'}, batch {'frames': [B, 1 + 4k,
    H, W, 3] in [-1, 1]}, key), for `train.trainer.Trainer`."""

    def __init__(self, vae: VAEConfig, config: AutoencoderConfig = AutoencoderConfig()):
        self.vae_config, self.config = vae, config
        self.encoder, self.decoder = WanVAEEncoder(vae), WanVAE(vae)

    def init(self, key: jax.Array) -> Params:
        k_enc, k_dec = jax.random.split(key)
        return {"encoder": self.encoder.init(k_enc), "decoder": self.decoder.init(k_dec)}

    def __call__(self, params: Params, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        cfg = self.config
        x = batch["frames"].astype(jnp.float32)
        mu, logvar = self.encoder.moments(params["encoder"], x)  # b t' h w z each
        logvar = jnp.clip(logvar, -30.0, 20.0)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape) if cfg.sample_posterior else mu
        recon = self.decoder.decode_raw(params["decoder"], z)  # b t h w 3
        err = recon - x
        l1, mse = jnp.mean(jnp.abs(err)), jnp.mean(err**2)
        kl = 0.5 * jnp.mean(mu**2 + jnp.exp(logvar) - 1.0 - logvar)
        loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
        clipped = jnp.mean((jnp.clip(recon, -1.0, 1.0) - x) ** 2)  # as decoded for viewing
        psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(clipped, 1e-10))  # the range [-1, 1] spans 2
        return loss, {"loss": loss, "l1": l1, "mse": mse, "kl": kl, "psnr": psnr}


class DecoderObjective(AutoencoderObjective):
    """The decoder alone, the encoder frozen (`encoder_params`): params {'decoder'}. For clips longer
    than the autoencoder was trained on, so the decoder learns its causal caches' steady state while
    the latents - and every model trained on them - stay as they are."""

    def __init__(self, vae: VAEConfig, encoder_params: Params, config: AutoencoderConfig = AutoencoderConfig()):
        super().__init__(vae, config)
        self.encoder_params = encoder_params

    def init(self, key: jax.Array) -> Params:
        raise ValueError("a decoder fine-tune starts from a trained decoder's params ({'decoder': ...})")

    def __call__(self, params: Params, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        frozen = jax.tree.map(jax.lax.stop_gradient, self.encoder_params)
        return super().__call__({"encoder": frozen, "decoder": params["decoder"]}, batch, key)


def latent_statistics(encoder: WanVAEEncoder, params: Params, clips) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float64 [z_dim] each) of the posterior means of `clips`, an iterable of
    [B, 1 + 4k, H, W, 3] batches in [-1, 1]: Wan's latent_mean / latent_std for a VAE of one's own."""
    moments = jax.jit(lambda p, x: encoder.moments(p, x)[0])
    total = total_sq = None
    count = 0
    for batch in clips:
        mu = np.asarray(moments(params, jnp.asarray(batch)), np.float64)
        flat = mu.reshape(-1, mu.shape[-1])  # (b t h w) z
        s, s2 = flat.sum(0), (flat**2).sum(0)
        total, total_sq = (s, s2) if total is None else (total + s, total_sq + s2)
        count += flat.shape[0]
    if not count:
        raise ValueError("latent_statistics needs at least one batch of clips")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return mean, std


def with_latent_statistics(vae: VAEConfig, mean: np.ndarray, std: np.ndarray) -> VAEConfig:
    """The config with its own latent statistics (the encoder then gives (mu - mean) / std)."""
    return dataclasses.replace(vae, latent_mean=tuple(float(m) for m in mean), latent_std=tuple(float(s) for s in std))


__all__ = ["AutoencoderConfig", "AutoencoderObjective", "DecoderObjective", "latent_statistics", "with_latent_statistics"]
