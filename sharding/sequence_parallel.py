"""The causal DiT under `jax.shard_map` with the chunk's tokens partitioned over a mesh.

`SequenceParallelDiT` wraps the one `CausalWanDiT` (no second copy of the blocks): it pads and shards
the patch tokens, runs `forward_tokens` inside shard_map with a Ulysses / ring / hybrid self-attention
and the shard's token offset (from `lax.axis_index`), and drops the padding on the way out. It is a
`ChunkModel`, as `CausalWanDiT` is: the sampler, the pipeline and the bench drive either.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from causal_dit_jax.model.attention import PAGE_TOKENS, local_self_attention
from causal_dit_jax.model.chunk_model import Array, Cache
from causal_dit_jax.model.config import InferenceConfig, ModelConfig
from causal_dit_jax.model.dit import CausalWanDiT, Params
from causal_dit_jax.model.kv_cache import KVCache, TextKV, cache_dtype, cache_keys, kv_cache_for
from causal_dit_jax.model.patchify import latents_to_tokens, tokens_to_latents
from causal_dit_jax.model.rope import RopeTables
from causal_dit_jax.sharding.mesh import make_mesh, mesh_sizes
from causal_dit_jax.sharding.partition_specs import SPECS
from causal_dit_jax.sharding.ring import ring_self_attention, ring_traffic
from causal_dit_jax.sharding.rope_sp import shard_token_offset
from causal_dit_jax.sharding.ulysses import check_heads, heads_to_seq, qkv_seq_to_heads


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """How one chunk's tokens lie on the mesh."""

    true_len: int  # real tokens of a chunk (frames * rows * cols)
    local_len: int  # tokens per device (the padded sequence / sequence devices)
    segment_len: int  # tokens per ring member after the all-to-all (ulysses * local_len)
    padded_len: int  # local_len * sequence devices


class SequenceParallelDiT:
    """Sequence-parallel execution of `dit` over `mesh` (axes data, ring, ulysses from `make_mesh`)."""

    def __init__(self, dit: CausalWanDiT | ModelConfig, mesh: Mesh):
        self.dit = dit if isinstance(dit, CausalWanDiT) else CausalWanDiT(dit)
        self.config = self.dit.config
        self.kernels = self.dit.kernels
        if self.kernels.norm_rope_impl == "pallas" and jax.default_backend() != "gpu":
            raise ValueError(
                "norm_rope_impl='pallas' under sequence parallelism needs GPUs: off GPUs Pallas runs in "
                "JAX's interpreter, which cannot run inside shard_map; use norm_rope_impl='xla'"
            )
        self.mesh = mesh
        self.data_size, self.ring_size, self.ulysses_size = mesh_sizes(mesh)
        check_heads(self.config.num_heads, self.ulysses_size)
        self.seq_devices = self.ring_size * self.ulysses_size

    # the single-device model's pure pieces are used as they are
    def init(self, rng):
        return self.dit.init(rng)

    def abstract_params(self):
        return self.dit.abstract_params()

    def rope_tables(self, max_frames: int, latent_height: int, latent_width: int) -> RopeTables:
        return self.dit.rope_tables(max_frames, latent_height, latent_width)

    def encode_text(self, params: Params, context: jax.Array) -> TextKV:
        return self.dit.encode_text(params, context)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def place(self, tree):
        """Params and inputs replicated over the mesh (the sharded forward splits the tokens itself)."""
        return jax.device_put(tree, self.replicated())

    # ------------------------------------------------------------------ layout
    def layout(self, frames: int, latent_height: int, latent_width: int) -> ChunkLayout:
        true_len = frames * self.config.tokens_per_frame(latent_height, latent_width)
        local = math.ceil(true_len / self.seq_devices)
        return ChunkLayout(true_len, local, self.ulysses_size * local, local * self.seq_devices)

    def init_cache(
        self, inference: InferenceConfig, batch: int, num_frames: int, latent_height: int, latent_width: int, origin_frame=0
    ) -> KVCache:
        """Zero cache placed on the mesh: heads split over 'ulysses'; with a ring, the sequence stays
        on the ring member that computed it (each member holds its segment of every cached chunk).
        Its dtype is `inference.cache_dtype`, or the model's when that is None."""
        if batch % self.data_size:
            raise ValueError(f"batch {batch} is not divisible by the mesh's data axis {self.data_size}")
        cfg = self.config
        lay = self.layout(inference.frames_per_chunk, latent_height, latent_width)
        cap = inference.cache_chunks(num_frames)
        if self.ring_size == 1:  # whole pages for cuDNN paged attention
            seq = cache_keys(cap, lay.true_len, PAGE_TOKENS if self.kernels.attention_impl == "cudnn_paged" else 1)
        else:
            seq = self.ring_size * cap * lay.segment_len
        shape = (cfg.num_layers, batch, seq, cfg.num_heads, cfg.head_dim)
        dtype = cache_dtype(cfg, inference)
        where = NamedSharding(self.mesh, SPECS.cache_lbsnd)  # made in place on each device, no transfer
        return kv_cache_for(
            inference, num_frames, jnp.zeros(shape, dtype, device=where), jnp.zeros(shape, dtype, device=where), origin_frame
        )

    # ------------------------------------------------------------------ attention
    def self_attention(self, layout: ChunkLayout):
        """The per-shard self-attention: all-to-all to heads, then local (ring size 1) or ring
        attention over the segment, then all-to-all back."""
        true_len = layout.true_len
        ring = self.ring_size
        impl = self.kernels.attention_impl

        def attention(q, k, v, layer_cache, write):
            q, k, v = qkv_seq_to_heads(q, k, v)  # b l n d -> b (u l) (n/u) d
            if ring == 1:  # the whole (padded) chunk is here: cache only real tokens
                out, layer_cache = local_self_attention(q, k[:, :true_len], v[:, :true_len], layer_cache, write, impl)
            else:
                out, layer_cache = ring_self_attention(q, k, v, layer_cache, write, true_len=true_len, implementation=impl)
            return heads_to_seq(out), layer_cache

        return attention

    # ------------------------------------------------------------------ forward
    def forward_tokens(
        self, params: Params, tokens: Array, t: Array, text: TextKV, cache: Cache, start_frame, rope: RopeTables, *, grid
    ) -> tuple[Array, Cache]:
        """Patch tokens [B, true_len, P] -> [B, true_len, P_out] through the sharded transformer."""
        frames, gh, gw = grid
        lay = self.layout(frames, gh * self.config.patch_size[1], gw * self.config.patch_size[2])
        if tokens.shape[1] != lay.true_len:
            raise ValueError(f"expected {lay.true_len} tokens, got {tokens.shape[1]}")
        if tokens.shape[0] % self.data_size:
            raise ValueError(f"batch {tokens.shape[0]} is not divisible by the data axis {self.data_size}")
        pad = lay.padded_len - lay.true_len
        tokens = jnp.pad(tokens, ((0, 0), (0, pad), (0, 0)))  # b l p -> b (l + pad) p
        attention = self.self_attention(lay)
        dit = self.dit

        def shard(params, tokens, t, text, cache, start_frame, rope):
            offset = shard_token_offset(lay.local_len)
            return dit.forward_tokens(
                params, tokens, t, text, cache, start_frame, rope, grid=grid, token_offset=offset, attention_fn=attention
            )

        cache_spec = None if cache is None else cache.replace(k=SPECS.cache_lbsnd, v=SPECS.cache_lbsnd, origin_frame=P())
        text_spec = TextKV(SPECS.text_lbknd, SPECS.text_lbknd)
        out, cache = jax.shard_map(
            shard,
            mesh=self.mesh,
            in_specs=(P(), SPECS.tokens_blp, SPECS.time_bf, text_spec, cache_spec, P(), P()),
            out_specs=(SPECS.tokens_blp, cache_spec),
        )(params, tokens, t, text, cache, jnp.asarray(start_frame, jnp.int32), rope)
        return out[:, : lay.true_len], cache

    def forward(
        self, params: Params, x: Array, t: Array, text: TextKV, cache: Cache, start_frame: Array | int, rope: RopeTables
    ) -> tuple[Array, Cache]:
        """Same contract as `CausalWanDiT.forward`, executed over the mesh."""
        tokens, grid = latents_to_tokens(self.config, x, t)
        out, cache = self.forward_tokens(params, tokens, t, text, cache, start_frame, rope, grid=grid)
        return tokens_to_latents(self.config, out, grid), cache

    # ------------------------------------------------------------------ accounting
    def comm_bytes_per_forward(
        self, inference: InferenceConfig, latent_height: int, latent_width: int, num_frames: int | None = None, batch: int = 1
    ) -> int:
        """Bytes each device sends per chunk forward in self-attention (all layers), as compiled.

        num_frames: the latent frames of the stream whose KV cache the forward carries (the cache's
        capacity, `inference.cache_chunks`, decides what a ring circulates; its fill changes
        nothing); None: a forward without a cache. batch: prompts of the forward (over every data
        group; each device sends its share). Activations are in the model's dtype, the cache in
        `inference`'s (`cache_dtype`).
        all-to-all: q/k/v in (3 tensors) and the output back (1), each sending (U-1)/U of the local
        [B, L_loc, N, D] block. ring: `ring.ring_traffic`, which the compiled ring follows: with a
        cache of 2+ slots R-1 hops of the query block and R-1 of its float32 result (constant in
        the video's length); without one (or with 1 slot) R-1 hops of the K/V block.
        """
        cfg = self.config
        if batch % self.data_size:
            raise ValueError(f"batch {batch} is not divisible by the mesh's data axis {self.data_size}")
        b = batch // self.data_size
        lay = self.layout(inference.frames_per_chunk, latent_height, latent_width)
        u, r = self.ulysses_size, self.ring_size
        act = jnp.dtype(cfg.dtype).itemsize
        local = b * lay.local_len * cfg.num_heads * cfg.head_dim * act
        a2a = 4 * local * (u - 1) // u if u > 1 else 0
        ring = 0
        if r > 1:
            slots, kv = 1, act  # without a cache the chunk's own k/v segment, in q's dtype
            if num_frames is not None:
                slots, kv = inference.cache_chunks(num_frames), jnp.dtype(cache_dtype(cfg, inference)).itemsize
            _, ring = ring_traffic(r, b, lay.segment_len, cfg.num_heads // u, cfg.head_dim, slots, act, kv)
        return cfg.num_layers * (a2a + ring)


def sequence_parallel_dit(
    dit: CausalWanDiT | ModelConfig,
    num_devices: int,
    strategy: str,
    inference: InferenceConfig,
    *,
    num_frames: int,
    latent_height: int,
    latent_width: int,
    batch: int = 1,
) -> tuple[SequenceParallelDiT, int]:
    """A SequenceParallelDiT on the first `num_devices` devices, plus the self-attention bytes each
    device sends per chunk of a `num_frames`-latent-frame stream: `comm_bytes_per_forward` (the same
    for every chunk) times the chunk's forwards (the denoising steps, then the cache fill)."""
    config = dit.config if isinstance(dit, CausalWanDiT) else dit
    sp = SequenceParallelDiT(dit, make_mesh(num_devices, strategy=strategy, num_heads=config.num_heads))
    forwards = len(inference.denoising_steps) + 1
    return sp, forwards * sp.comm_bytes_per_forward(inference, latent_height, latent_width, num_frames, batch)
