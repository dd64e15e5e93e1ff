"""A DiT objective with its text encoder trained jointly, and caption dropout for guidance.

Wraps any objective of (dit params, {'latents', 'text': encoder states, ...}, key) - teacher forcing,
diffusion forcing - into one of (params {'dit', 'text'}, {'latents', 'ids', 'mask', ...}, key): the
umT5 encoder turns the token ids into the states inside the loss, so its weights get gradients too.
With probability `drop_prob` a caption is replaced by the empty one (the unconditional branch that
classifier-free guidance subtracts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.model.dit import Params
from causal_dit_jax.text.umt5 import UMT5Encoder


def empty_caption(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The empty caption's (ids, mask) [max_length]: the end-of-sequence token alone, then padding
    (the tokenizer itself refuses an empty prompt)."""
    ids = np.full(tokenizer.max_length, tokenizer.pad_id, np.int32)
    mask = np.zeros(tokenizer.max_length, np.int32)
    ids[0], mask[0] = tokenizer.eos_id, 1
    return ids, mask


class JointTextObjective:
    """inner: the DiT objective; text_encoder: the umT5 encoder whose `text_context` feeds it;
    null_ids / null_mask [K]: the empty caption's tokens (`empty_caption`, padded like every batch)."""

    def __init__(self, inner, text_encoder: UMT5Encoder, null_ids: np.ndarray, null_mask: np.ndarray, drop_prob: float = 0.1):
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.inner, self.text_encoder, self.drop_prob = inner, text_encoder, drop_prob
        self.null_ids = np.asarray(null_ids, np.int32)
        self.null_mask = np.asarray(null_mask, np.int32)

    def context(self, text_params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Token ids, mask [B, K] -> the encoder's states [B, text_len, C], as the pipeline computes them."""
        return self.text_encoder.text_context(text_params, ids, mask)

    def __call__(self, params: Params, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        k_drop, k_inner = jax.random.split(key)
        ids, mask = batch["ids"], batch["mask"]
        if ids.shape[-1] != self.null_ids.shape[-1]:
            raise ValueError(f"captions of {ids.shape[-1]} tokens, the empty caption of {self.null_ids.shape[-1]}")
        drop = jax.random.uniform(k_drop, (ids.shape[0], 1)) < self.drop_prob  # b 1
        ids = jnp.where(drop, jnp.asarray(self.null_ids)[None], ids)
        mask = jnp.where(drop, jnp.asarray(self.null_mask)[None], mask)
        inner_batch = {k: v for k, v in batch.items() if k not in ("ids", "mask")}
        inner_batch["text"] = self.context(params["text"], ids, mask)
        loss, metrics = self.inner(params["dit"], inner_batch, k_inner)
        return loss, {**metrics, "dropped": jnp.mean(drop.astype(jnp.float32))}


__all__ = ["JointTextObjective", "empty_caption"]
