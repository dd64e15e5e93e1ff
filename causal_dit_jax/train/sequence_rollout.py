"""The generator's KV-cached rollout over a training mesh's 'seq' axis (Self-Forcing DMD on a sequence
mesh): each chunk's tokens split over 'seq', the cached self-attention under shard_map."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from causal_dit_jax.model.attention import local_self_attention
from causal_dit_jax.model.config import InferenceConfig, ModelConfig
from causal_dit_jax.model.dit import CausalWanDiT, Params
from causal_dit_jax.model.kv_cache import CacheWrite, KVCache, LayerCache, TextKV, init_kv_cache
from causal_dit_jax.model.patchify import latents_to_tokens, tokens_to_latents
from causal_dit_jax.model.rope import RopeTables
from causal_dit_jax.sharding.mesh import DATA
from causal_dit_jax.sharding.ring import ring_self_attention
from causal_dit_jax.sharding.train_attention import SEQ, check_sequence_split, sequence_size
from causal_dit_jax.sharding.ulysses import heads_to_seq, qkv_seq_to_heads
from causal_dit_jax.train.objectives import sequence_sharding


def check_rollout_split(config: ModelConfig, frames_per_chunk: int, latent_height: int, latent_width: int, seq: int):
    """Raise a ValueError unless a rollout chunk's patch tokens split over a 'seq' axis of `seq` devices."""
    tokens = frames_per_chunk * config.tokens_per_frame(latent_height, latent_width)
    if tokens % seq:
        fits = [d for d in range(1, tokens + 1) if tokens % d == 0]
        raise ValueError(
            f"a rollout chunk of {frames_per_chunk} latent frames at {latent_height}x{latent_width} is {tokens} "
            f"patch tokens, which do not split over the {SEQ!r} axis of {seq} devices; 'seq' sizes that divide "
            f"them: {fits} (or change frames_per_chunk or the latent size)"
        )


class SequenceRolloutModel:
    """The generator's KV-cached chunk forward over a training mesh's 'seq' axis: the `ChunkModel` part
    (`forward`, `init_cache`) that `SelfForcingSampler` drives in `generator_rollout`.

    As `sequence_forward` does for a whole clip, the chunk's patch tokens [B, L, C] are constrained to
    the batch over 'data' and the tokens over 'seq', so XLA partitions the blocks (projections, FFN,
    cross-attention) along them; the cached self-attention alone runs under shard_map, by one of:

      Ulysses (the heads divide by seq): q/k/v [B/data, L/seq, N, D] -> all-to-all -> [B/data, L,
        N/seq, D], the one-device cached attention on those heads (each device writes and reads its
        heads of the cache: [layers, B, S, N, D], one device's array with N over 'seq'), all-to-all
        back. Each device then holds the whole chunk's keys for N/seq heads.
      ring (any heads): each device keeps its tokens' segment of every cached chunk (the cache's key
        axis over 'seq': device r's part holds tokens [r L/seq, (r + 1) L/seq) of each slot), and the
        query blocks travel around the ring to the keys (`sharding.ring.ring_self_attention`).

    The chunk's tokens must split over 'seq' (`check_rollout_split`, raised when traced)."""

    def __init__(self, dit: CausalWanDiT, mesh: Mesh):
        if sequence_size(mesh) == 1:
            raise ValueError(f"SequenceRolloutModel needs a mesh with a {SEQ!r} axis of 2+ devices, got {dict(mesh.shape)}")
        self.dit, self.mesh, self.seq = dit, mesh, sequence_size(mesh)
        self.config, self.kernels = dit.config, dit.kernels
        self.ulysses = self.config.num_heads % self.seq == 0
        data = DATA if DATA in mesh.axis_names else None
        self.qkv_spec = P(data, SEQ, None, None)  # b l n d
        self.cache_spec = P(None, data, None, SEQ, None) if self.ulysses else P(None, data, SEQ, None, None)  # l b s n d

    def init_cache(
        self, inference: InferenceConfig, batch: int, num_frames: int, latent_height: int, latent_width: int, origin_frame=0
    ) -> KVCache:
        """A zero cache on the mesh: one device's (heads over 'seq') for Ulysses; for the ring the same
        shape, unaligned, whose key axis over 'seq' holds each device's segments of the slots."""
        check_rollout_split(self.config, inference.frames_per_chunk, latent_height, latent_width, self.seq)
        if self.ulysses:
            cache = self.dit.init_cache(inference, batch, num_frames, latent_height, latent_width, origin_frame)
        else:
            chunk = inference.frames_per_chunk * self.config.tokens_per_frame(latent_height, latent_width)
            cache = init_kv_cache(self.config, inference, batch, num_frames, chunk, origin_frame=origin_frame)
        k, v = jax.lax.with_sharding_constraint((cache.k, cache.v), NamedSharding(self.mesh, self.cache_spec))
        return cache.replace(k=k, v=v)

    def attention(self, chunk_tokens: int):
        """The cached self-attention (a `SelfAttentionFn`) of a chunk of `chunk_tokens` tokens."""
        impl = self.kernels.attention_impl

        def shard(q, k, v, layer_cache: LayerCache, write: CacheWrite):  # q k v: b (l/s) n d
            if not self.ulysses:
                return ring_self_attention(q, k, v, layer_cache, write, true_len=chunk_tokens, axis=SEQ, implementation=impl)
            q, k, v = qkv_seq_to_heads(q, k, v, SEQ)  # b (l/s) n d -> b l (n/s) d
            out, layer_cache = local_self_attention(q, k, v, layer_cache, write, impl)
            return heads_to_seq(out, SEQ), layer_cache  # b l (n/s) d -> b (l/s) n d

        layer_spec = LayerCache(self.cache_spec, self.cache_spec, P())
        specs = (self.qkv_spec,) * 3 + (layer_spec, P())
        return jax.shard_map(shard, mesh=self.mesh, in_specs=specs, out_specs=(self.qkv_spec, layer_spec))

    def forward(
        self, params: Params, x: jax.Array, t: jax.Array, text: TextKV, cache: KVCache, start_frame, rope: RopeTables
    ) -> tuple[jax.Array, KVCache]:
        """`CausalWanDiT.forward` of a chunk x [B, c, H, W, C] with its tokens over 'seq' and the cache
        of `init_cache` (required: the rollout always has one)."""
        if cache is None:
            raise ValueError("SequenceRolloutModel.forward needs a KV cache (make it with init_cache)")
        b, c, h, w = x.shape[:4]
        check_rollout_split(self.config, c, h, w, self.seq)
        check_sequence_split(self.mesh, batch=b)
        where = sequence_sharding(self.mesh)  # b l c: batch over 'data', tokens over 'seq'
        tokens, grid = latents_to_tokens(self.config, x, t)
        tokens = jax.lax.with_sharding_constraint(tokens, where)
        attention = self.attention(tokens.shape[1])
        out, cache = self.dit.forward_tokens(
            params, tokens, t, text, cache, start_frame, rope, grid=grid, attention_fn=attention
        )
        out = jax.lax.with_sharding_constraint(out, where)
        return tokens_to_latents(self.config, out, grid), cache


__all__ = ["SequenceRolloutModel", "check_rollout_split"]
