"""The causal Wan2.1 DiT as pure functions of (params, inputs).

`CausalWanDiT` holds only static things (the config, the graph definitions of its Flax NNX modules,
the self-attention function); parameters are a plain pytree:

    {'stem': {...}, 'blocks': {... every leaf stacked over layers ...}, 'head': {...}}

and every method is a pure function of params and arrays, safe under `jax.jit`, `jax.grad` and
`jax.shard_map`. Layers run in a `lax.scan` over the stacked block parameters.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from causal_dit_jax.model.attention import PAGE_TOKENS, SelfAttentionFn, default_implementation, make_local_self_attention
from causal_dit_jax.model.blocks import WanBlock
from causal_dit_jax.model.chunk_model import Array, Cache
from causal_dit_jax.model.config import InferenceConfig, KernelConfig, ModelConfig, dtype_from_name
from causal_dit_jax.model.fp8_linear import quantize_block_params
from causal_dit_jax.model.kv_cache import KVCache, LayerCache, TextKV, cache_write_index, init_kv_cache
from causal_dit_jax.model.layers import MLP, layer_norm, per_token, sinusoidal_embedding
from causal_dit_jax.model.patchify import latents_to_tokens, tokens_to_latents
from causal_dit_jax.model.rope import RopeTables, causal_rope_positions, rope_cos_sin, rope_tables

Params = dict[str, Any]


class Stem(nnx.Module):
    """Patch embedding, text embedding and the per-frame time embedding / projection."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtype_from_name(config.dtype), dtype_from_name(config.param_dtype)
        c = config.dim
        self.dim = c
        self.freq_dim = config.freq_dim
        self.patch_embedding = nnx.Linear(config.patch_features, c, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.text_embedding = MLP(config.text_dim, c, c, "gelu_tanh", dtype=dtype, param_dtype=pdtype, rngs=rngs)
        # The time path runs in float32, as in Wan2.1.
        self.time_embedding = MLP(config.freq_dim, c, c, "silu", dtype=jnp.float32, param_dtype=pdtype, rngs=rngs)
        self.time_projection = nnx.Linear(c, 6 * c, dtype=jnp.float32, param_dtype=pdtype, rngs=rngs)

    def embed_time(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """t [B, F] -> e [B, F, C] (for the head) and the block modulation e0 [B, F, 6, C]; float32."""
        e = self.time_embedding(sinusoidal_embedding(t, self.freq_dim))
        e0 = self.time_projection(jax.nn.silu(e))
        return e, e0.reshape(*e0.shape[:-1], 6, self.dim)  # b f (6 c) -> b f 6 c


class Head(nnx.Module):
    """Final modulated LayerNorm and projection to patch values."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        pdtype = dtype_from_name(config.param_dtype)
        c = config.dim
        self.eps = config.eps
        init = jax.random.normal(rngs.params(), (2, c), jnp.float32) / c**0.5
        self.modulation = nnx.Param(init.astype(pdtype))
        self.head = nnx.Linear(c, config.out_features, dtype=dtype_from_name(config.dtype), param_dtype=pdtype, rngs=rngs)

    def __call__(self, x: jax.Array, e: jax.Array, frame_ids: jax.Array | None) -> jax.Array:
        """x [B, L, C], e [B, F, C] -> [B, L, out_features] (float32)."""
        mod = e[:, :, None, :] + self.modulation[...].astype(jnp.float32)  # b f 2 c
        mod = per_token(mod, frame_ids, x.shape[1])  # b f 2 c -> b l 2 c
        shift, scale = mod[:, :, 0], mod[:, :, 1]
        h = layer_norm(x, self.eps) * (1 + scale) + shift
        return self.head(h.astype(self.head.dtype)).astype(jnp.float32)


class CausalWanDiT:
    """Causal, KV-cached Wan DiT. Build from a `ModelConfig`; params come from `init` or `convert`.

    kernels: how the kernels run (`KernelConfig`: attention, q/k norm + RoPE, linear precision,
    layer-loop unroll); its attention_impl None becomes the backend's default here. A float8 model
    takes the params of `quantize(params)` (its `init` and `load_dit` return them).
    attention_fn: the self-attention kernel (see `attention.local_self_attention`; default: the one
    `kernels.attention_impl` names).
    """

    def __init__(
        self, config: ModelConfig, kernels: KernelConfig = KernelConfig(), attention_fn: SelfAttentionFn | None = None
    ):
        if not isinstance(kernels, KernelConfig):
            raise TypeError(f"kernels must be a KernelConfig, got {type(kernels).__name__}")
        self.config = config
        self.kernels = kernels.replace(attention_impl=kernels.attention_impl or default_implementation(config.dtype))
        self.attention_fn = attention_fn or make_local_self_attention(self.kernels.attention_impl)
        self._stem_def = nnx.graphdef(nnx.eval_shape(lambda: Stem(config, rngs=nnx.Rngs(0))))
        self._block_def = nnx.graphdef(nnx.eval_shape(lambda: WanBlock(config, self.kernels, rngs=nnx.Rngs(0))))
        self._head_def = nnx.graphdef(nnx.eval_shape(lambda: Head(config, rngs=nnx.Rngs(0))))

    @property
    def num_devices(self) -> int:
        return 1

    def place(self, tree):
        """Inputs stay where they are on one device."""
        return tree

    # ----------------------------------------------------------------- parameters
    def init(self, rng: jax.Array) -> Params:
        """Random parameters: {'stem', 'blocks' (stacked over layers), 'head'} (quantised for float8)."""
        cfg = self.config
        k_stem, k_blocks, k_head = jax.random.split(rng, 3)

        def one_block(key):
            return nnx.to_pure_dict(nnx.state(WanBlock(cfg, rngs=nnx.Rngs(key))))

        return self.quantize(
            {
                "stem": nnx.to_pure_dict(nnx.state(Stem(cfg, rngs=nnx.Rngs(k_stem)))),
                "blocks": jax.vmap(one_block)(jax.random.split(k_blocks, cfg.num_layers)),
                "head": nnx.to_pure_dict(nnx.state(Head(cfg, rngs=nnx.Rngs(k_head)))),
            }
        )

    def quantize(self, params: Params) -> Params:
        """Params in the bfloat16 layout (`init` of a bfloat16 model, a converted checkpoint) -> this
        model's layout: unchanged for 'bfloat16', the block linears in e4m3 for 'float8' (stacked or
        `unstack_blocks` per-layer blocks; already quantised ones pass through)."""
        if self.kernels.linear_precision == "bfloat16":
            return params
        blocks = params["blocks"]
        if _per_layer(blocks):
            return {**params, "blocks": tuple(quantize_block_params(b) for b in blocks)}
        return {**params, "blocks": quantize_block_params(blocks)}

    def abstract_params(self) -> Params:
        """ShapeDtypeStructs of the parameter tree (no memory)."""
        return jax.eval_shape(self.init, jax.random.key(0))

    def rope_tables(self, max_frames: int, latent_height: int, latent_width: int) -> RopeTables:
        """RoPE tables for global frames [0, max_frames) at this latent size (compute once per stream)."""
        _, ph, pw = self.config.patch_size
        self.config.tokens_per_frame(latent_height, latent_width)
        return rope_tables(self.config, max_frames, latent_height // ph, latent_width // pw)

    def init_cache(
        self, inference: InferenceConfig, batch: int, num_frames: int, latent_height: int, latent_width: int, origin_frame=0
    ) -> KVCache:
        """Zero KV cache for a stream of `num_frames` latent frames starting at global frame `origin_frame`."""
        tpf = self.config.tokens_per_frame(latent_height, latent_width)
        align = PAGE_TOKENS if self.kernels.attention_impl == "cudnn_paged" else 1  # whole pages for paged attention
        return init_kv_cache(
            self.config, inference, batch, num_frames, tpf * inference.frames_per_chunk, origin_frame=origin_frame, align=align
        )

    # ----------------------------------------------------------------- text
    def encode_text(self, params: Params, context: jax.Array) -> TextKV:
        """Text encoder states [B, K, text_dim] -> per-layer cross-attention K/V (once per prompt)."""
        cfg = self.config
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"text context must be [batch, tokens, {cfg.text_dim}], got {context.shape}")
        stem = nnx.merge(self._stem_def, params["stem"])
        text = stem.text_embedding(context.astype(dtype_from_name(cfg.dtype)))

        def body(_, block_params):
            block = nnx.merge(self._block_def, block_params)
            return None, block.cross_attn.text_kv(text)

        if _per_layer(params["blocks"]):  # unstack_blocks
            kv = [body(None, block_params)[1] for block_params in params["blocks"]]
            return TextKV(k=jnp.stack([k for k, _ in kv]), v=jnp.stack([v for _, v in kv]))
        _, (k, v) = jax.lax.scan(body, None, params["blocks"])
        return TextKV(k=k, v=v)

    # ----------------------------------------------------------------- forward
    def forward(
        self, params: Params, x: Array, t: Array, text: TextKV, cache: Cache, start_frame: Array | int, rope: RopeTables
    ) -> tuple[Array, Cache]:
        """One chunk: latents x [B, F, H, W, C_in], per-frame timesteps t [B, F], the prompt's TextKV,
        the KV cache (or None: the chunk attends to itself only) and the chunk's global start frame.

        Returns the flow prediction [B, F, H, W, C_out] (float32) and the updated cache.
        """
        tokens, grid = latents_to_tokens(self.config, x, t)
        out, cache = self.forward_tokens(params, tokens, t, text, cache, start_frame, rope, grid=grid)
        return tokens_to_latents(self.config, out, grid), cache

    def forward_tokens(
        self,
        params: Params,
        tokens: Array,
        t: Array,
        text: TextKV,
        cache: Cache,
        start_frame: Array | int,
        rope: RopeTables,
        *,
        grid: tuple[int, int, int],
        token_offset: Array | int = 0,
        attention_fn: SelfAttentionFn | None = None,
        frame_time: Array | None = None,
        remat: bool = False,
    ) -> tuple[Array, Cache]:
        """The transformer on patch tokens [B, L, ph*pw*C_in] -> [B, L, ph*pw*C_out] (float32).

        `tokens` may be a shard of the chunk's flattened (frame, row, col) sequence starting at
        `token_offset` (0 on one device); positions, frames and RoPE rows are derived from it locally.
        attention_fn overrides the model's self-attention kernel (sequence parallelism binds one per
        chunk shape; training binds a block-attention plan).
        frame_time: [F] int32, each frame's RoPE time index instead of start_frame + frame (training's
        [clean | noisy] sequence gives both copies the same positions).
        remat: recompute each block's activations in the backward pass (jax.checkpoint), for training.
        """
        attention_fn = attention_fn or self.attention_fn
        cfg = self.config
        frames, gh, gw = grid
        if text.k.shape[0] != cfg.num_layers:
            raise ValueError(f"TextKV has {text.k.shape[0]} layers, the model {cfg.num_layers}")
        res_dtype = dtype_from_name(cfg.residual_dtype)
        index = jnp.asarray(token_offset, jnp.int32) + jnp.arange(tokens.shape[1], dtype=jnp.int32)
        time, row, col = causal_rope_positions(index, gh, gw, start_frame)
        if frame_time is not None:
            time = jnp.asarray(frame_time, jnp.int32)[jnp.clip(index // (gh * gw), 0, frames - 1)]
        cos, sin = rope_cos_sin(rope, time, row, col)
        whole_frames = isinstance(token_offset, int) and token_offset == 0 and tokens.shape[1] == frames * gh * gw
        frame_ids = None if whole_frames else jnp.clip(index // (gh * gw), 0, frames - 1)

        stem = nnx.merge(self._stem_def, params["stem"])
        x = stem.patch_embedding(tokens.astype(dtype_from_name(cfg.dtype))).astype(res_dtype)
        e, e0 = stem.embed_time(t)

        write = None if cache is None else cache_write_index(cache, start_frame)
        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)

        def body(carry, layer):
            x, cache_kv = carry
            block_params, tk, tv, index = layer
            block = nnx.merge(self._block_def, block_params)
            layer_cache = None if cache_kv is None else LayerCache(*cache_kv, index)
            x, layer_cache = block(x, e0, frame_ids, cos, sin, tk, tv, layer_cache, write, attention_fn)
            return (x, None if layer_cache is None else (layer_cache.k, layer_cache.v)), None

        if remat:
            body = jax.checkpoint(body)
        # The cache rides in the carry: each layer updates its chunk slot in place.
        cache_kv = None if cache is None else (cache.k, cache.v)
        if _per_layer(params["blocks"]):  # unstack_blocks: a Python loop
            if len(params["blocks"]) != cfg.num_layers:
                raise ValueError(f"params hold {len(params['blocks'])} blocks, the model {cfg.num_layers}")
            for i, block_params in enumerate(params["blocks"]):
                (x, cache_kv), _ = body((x, cache_kv), (block_params, text.k[i], text.v[i], i))
        else:
            (x, cache_kv), _ = jax.lax.scan(
                body, (x, cache_kv), (params["blocks"], text.k, text.v, layers), unroll=self.kernels.scan_unroll
            )
        head = nnx.merge(self._head_def, params["head"])
        out = head(x, e, frame_ids)
        if cache is not None:
            cache = cache.replace(k=cache_kv[0], v=cache_kv[1])
        return out, cache


def _per_layer(blocks) -> bool:
    """True for `unstack_blocks`'s per-layer tuple, False for arrays stacked over layers."""
    return isinstance(blocks, (tuple, list))


def unstack_blocks(params: Params) -> Params:
    """DiT params with 'blocks' as a tuple of per-layer trees instead of arrays stacked over layers.

    `forward` then runs the layers as a Python loop in which each GEMM reads its weight buffer in
    place; a loop over stacked weights (scan, fori_loop, even a fully unrolled scan) copies each
    layer's weights out first (`benchmarks/weight_slice_probe.py`). The price: the program holds one
    copy of the layer per layer, so it compiles about twice as long (figures in benchmarks/NOTES.md).
    Run outside jit, once; the stacked arrays can then be dropped."""
    blocks = params["blocks"]
    if _per_layer(blocks):
        return params
    n = jax.tree.leaves(blocks)[0].shape[0]
    return {**params, "blocks": tuple(jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(n))}


@functools.cache
def param_count(config: ModelConfig) -> int:
    """Number of parameters of the model described by `config`."""
    return sum(math.prod(s.shape) for s in jax.tree.leaves(CausalWanDiT(config).abstract_params()))


def load_dit(ckpt_dir, sharding=None, kernels: KernelConfig = KernelConfig()) -> tuple[CausalWanDiT, Params]:
    """Model and params from a converted checkpoint folder; `sharding` places params (e.g. replicated);
    kernels.linear_precision 'float8' quantises the block linears after loading (see `CausalWanDiT`)."""
    from causal_dit_jax.checkpoint import read_checkpoint_config, restore_component

    meta = read_checkpoint_config(ckpt_dir)
    if "dit" not in meta:
        raise ValueError(f"{ckpt_dir}: config.json has no 'dit' section")
    config = ModelConfig.from_dict(meta["dit"])
    dit = CausalWanDiT(config, kernels)
    params = restore_component(ckpt_dir, "dit", CausalWanDiT(config).abstract_params(), sharding)
    return dit, jax.jit(dit.quantize)(params) if kernels.linear_precision != "bfloat16" else params
