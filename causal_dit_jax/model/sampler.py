"""Self-Forcing few-step sampling, chunk by chunk, with the KV cache and the cache-fill pass.

Per chunk of `frames_per_chunk` latent frames: for each timestep t_k of the warped schedule, predict
the flow v, take x0 = x - sigma_k v, and (except after the last step) re-noise x = (1 - sigma_{k+1})
x0 + sigma_{k+1} eps. Then one forward of the clean x0 at timestep `context_noise` overwrites the
chunk's cache slot with clean keys/values. The denoising steps of a chunk run in one jitted call; every chunk
reuses the same executable (the start frame is traced). The cache fill is a separate call queued
after the chunk is handed out, so the consumer's decode of it is not delayed by the fill. The last
chunk's fill is skipped by default: no later chunk reads it (Self-Forcing's loop runs it anyway).

Conditioning on video (`stream`'s `context` and `first_step`): clean context latents (an encoded
image or clip) are run chunk by chunk at t=0 into the cache before the first generated chunk, as
Self-Forcing's `initial_latent` path; video-to-video starts each chunk at a later denoising step from
an encoded video noised to that step (`noise_to_step`, `first_step_for_strength`).

Prompt switching (`stream`'s `text_for_chunk`): a chunk may attend to a new prompt, and LongLive's KV
re-cache then re-fills the cache from the last clean chunks with the new text (`kv_recache`), so that
the next chunk does not read keys made under the old prompt.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

from causal_dit_jax.model.chunk_model import ChunkModel, Params
from causal_dit_jax.model.config import InferenceConfig
from causal_dit_jax.model.kv_cache import KVCache, TextKV
from causal_dit_jax.model.rope import RopeTables
from causal_dit_jax.model.scheduler import denoising_timesteps, sigma_for_timestep


def draw_step_noise(key: jax.Array, chunk_index: int | jax.Array, shape: tuple[int, ...], num_steps: int) -> jax.Array:
    """The fresh noise of one chunk's re-noising steps: [num_steps - 1, *shape] float32."""
    return jax.random.normal(jax.random.fold_in(key, chunk_index), (max(num_steps - 1, 1), *shape), jnp.float32)


def first_step_for_strength(strength: float, num_steps: int) -> int:
    """The denoising step a video-to-video `strength` in (0, 1] starts from: int(strength * steps)
    steps run (as diffusers' img2img), so 1 is text-to-video from pure noise and 1 / steps the least
    change (the last step alone)."""
    n = num_steps
    if not 0.0 < strength <= 1.0 or int(strength * n) < 1:
        raise ValueError(
            f"strength must be in [{1 / n:g}, 1] for a {n}-step schedule (it runs int(strength * {n}) steps), got {strength}"
        )
    return n - int(strength * n)


class SelfForcingSampler:
    """Streams latents of a video chunk by chunk.

    dit: a `ChunkModel` (`CausalWanDiT` on one device, `SequenceParallelDiT` over a mesh).
    inference: schedule, chunking, cache window. Latents are channels-last [B, F, H, W, C].
    """

    def __init__(self, dit: ChunkModel, inference: InferenceConfig = InferenceConfig()):
        self.dit = dit
        self.inference = inference
        self.timesteps = denoising_timesteps(
            inference.denoising_steps, inference.timestep_shift, inference.num_train_timesteps, inference.warp_denoising_step
        )
        self.sigmas = sigma_for_timestep(self.timesteps, inference.timestep_shift, inference.num_train_timesteps)
        self._denoise_fn = jax.jit(self.denoise, donate_argnums=(3,), static_argnames=("first_step",))
        self._fill_fn = jax.jit(self.fill_cache, donate_argnums=(2,))
        self._context_fn = jax.jit(functools.partial(self.fill_cache, timestep=0.0), donate_argnums=(2,))

    # ------------------------------------------------------------------ one chunk
    def denoise(
        self,
        params: Params,
        noise: jax.Array,
        eps: jax.Array,
        cache: KVCache,
        text: TextKV,
        start_frame: jax.Array,
        rope: RopeTables,
        first_step: int = 0,
    ) -> tuple[jax.Array, KVCache]:
        """The few-step denoising of one chunk from pure noise [B, c, H, W, C]; eps: [steps - 1, B, c,
        H, W, C] re-noising draws (row k re-noises after step k). Returns x0 [B, c, H, W, C] float32
        and the cache, whose slot holds the last step's noisy keys until `fill_cache` overwrites it
        with the clean chunk's. first_step (static): start at that step of the schedule, `noise` then
        being the chunk at that step's noise level (video-to-video); rows before it are not read."""
        b, c = noise.shape[:2]
        ts = jnp.asarray(self.timesteps[first_step:], jnp.float32)
        sig = jnp.asarray(self.sigmas[first_step:], jnp.float32)
        n = len(ts)
        sig_next = jnp.concatenate([sig[1:], jnp.zeros((1,), jnp.float32)])
        eps = jnp.concatenate([eps[first_step : first_step + n - 1], jnp.zeros((1, *noise.shape), jnp.float32)], axis=0)

        def step(carry, xs):
            x, cache = carry
            t_k, s_k, s_next, e, last = xs
            x0, cache = self.step_x0(params, x, t_k, s_k, cache, text, start_frame, rope)
            return (jnp.where(last, x0, self.renoise(x0, s_next, e)), cache), None

        is_last = jnp.arange(n) == n - 1
        (x0, cache), _ = jax.lax.scan(step, (noise.astype(jnp.float32), cache), (ts, sig, sig_next, eps, is_last))
        return x0, cache

    def step_x0(self, params, x, t_k, sigma_k, cache: KVCache, text: TextKV, start_frame, rope) -> tuple[jax.Array, KVCache]:
        """One denoising step of a chunk x [B, c, H, W, C] at timestep t_k / noise level sigma_k: the
        flow prediction's x0 (float32) and the cache with the chunk's keys in its slot."""
        b, c = x.shape[:2]
        flow, cache = self.dit.forward(params, x, jnp.full((b, c), t_k, jnp.float32), text, cache, start_frame, rope)
        return x - sigma_k * flow, cache

    @staticmethod
    def renoise(x0: jax.Array, sigma_next, eps: jax.Array) -> jax.Array:
        """x0 taken back to the next step's noise level with fresh noise eps (the flow-matching path)."""
        return (1 - sigma_next) * x0 + sigma_next * eps

    def fill_cache(
        self,
        params: Params,
        x0: jax.Array,
        cache: KVCache,
        text: TextKV,
        start_frame: jax.Array,
        rope: RopeTables,
        timestep: float | None = None,
    ) -> KVCache:
        """The cache-fill pass: the clean chunk at timestep `context_noise` (or `timestep`: 0 for the
        context latents, as Self-Forcing's initial_latent pass) overwrites its cache slot."""
        b, c = x0.shape[:2]
        t_value = self.inference.context_noise if timestep is None else timestep
        t_ctx = jnp.full((b, c), t_value, jnp.float32)
        _, cache = self.dit.forward(params, x0, t_ctx, text, cache, start_frame, rope)
        return cache

    # ------------------------------------------------------------------ whole video
    def init_cache(self, batch: int, num_frames: int, latent_height: int, latent_width: int, start_frame: int = 0) -> KVCache:
        """A zero KV cache for a stream of `num_frames` latent frames starting at `start_frame`."""
        return self.dit.init_cache(self.inference, batch, num_frames, latent_height, latent_width, start_frame)

    @property
    def forwards_per_chunk(self) -> int:
        """DiT forwards of one chunk: the denoising steps and the cache-fill pass."""
        return len(self.timesteps) + 1

    def prefill(
        self, params: Params, text: TextKV, context: jax.Array, cache: KVCache, start_frame: int, rope: RopeTables
    ) -> KVCache:
        """Run clean context latents [B, P, H, W, C] (P a multiple of frames_per_chunk) chunk by chunk
        at t=0 into the cache at frames start_frame .. start_frame + P - 1 (Self-Forcing's
        initial_latent pass: one forward per chunk, its output discarded). The cache is consumed."""
        c = self.inference.frames_per_chunk
        for j in range(context.shape[1] // c):
            start = jnp.asarray(start_frame + j * c, jnp.int32)
            cache = self._context_fn(params, context[:, j * c : (j + 1) * c], cache, text, start, rope)
        return cache

    def recache_limit(self, num_frames: int, recache_chunks: int | None = None) -> int:
        """The chunks a KV re-cache re-fills at most in a stream whose cache holds `num_frames` latent
        frames (context included): the earlier chunks a chunk attends, the sink not counted (every
        earlier chunk under global attention). recache_chunks, if given, is checked against it (0: a
        cut, nothing re-filled) and returned. A sink that is not whole chunks is refused: after a
        re-cache the re-filled chunks would see the sink chunk's frames that the window has evicted."""
        layout = self.inference.cache_layout(num_frames)
        c = self.inference.frames_per_chunk
        if layout.sink_frames % c:
            raise ValueError(
                f"a KV re-cache needs an attention sink of whole chunks (sink_size a multiple of "
                f"frames_per_chunk={c}), got sink_size={layout.sink_frames}; switch the prompt without it (recache=False)"
            )
        limit = max(layout.capacity - layout.sink_chunks - 1, 0)
        if recache_chunks is None:
            return limit
        if isinstance(recache_chunks, bool) or not isinstance(recache_chunks, int) or not 0 <= recache_chunks <= limit:
            raise ValueError(
                f"recache_chunks must be an int in [0, {limit}] (the earlier chunks this stream's cache lets a "
                f"chunk attend{', less the sink' if layout.sink_chunks else ''}; 0 cuts), got {recache_chunks!r}"
            )
        return recache_chunks

    def kv_recache(
        self,
        params: Params,
        text: TextKV,
        recent: Sequence[tuple[int, jax.Array, bool]],
        cache: KVCache,
        origin: int,
        next_start: int,
        rope: RopeTables,
        cut: bool = False,
    ) -> tuple[KVCache, int]:
        """LongLive's KV re-cache: the clean chunks `recent` run again into the cache with `text`, in
        order, each seeing the sink and the re-filled chunks before it (not the later ones, nor what the
        cache held before); the chunk from frame `next_start` (the next to denoise) then sees the sink
        and them. recent: (start frame, latents [B, c, H, W, C], whether it is context, run at t=0 as
        `prefill` does; else at `context_noise` as `fill_cache`), the consecutive chunks just before
        next_start, oldest first, none of them a sink chunk (empty: the sink alone is kept).
        cut: nothing re-filled and the sink dropped too (`recent` must be empty): the chunk from
        next_start starts a new stream, it sees nothing before it and becomes the sink.
        origin: the cache's `origin_frame` as a host int (read nothing back from the device).

        How: keys carry their absolute positions, so the cache's chunk order is free. The origin moves
        so that the oldest re-filled chunk takes the first slot after the sink: each re-filled chunk
        then finds the sink and the re-filled chunks before it as the valid slots, the rest of the
        ring as not yet written (the window's frame mask is unchanged: it counts frames relative to the
        chunk). After a cut the origin is next_start itself. Later chunks go on from there. Returns the
        cache (consumed) and its new origin."""
        c = self.inference.frames_per_chunk
        if cut and recent:
            raise ValueError(f"a cut re-fills no chunks, got {len(recent)} to re-fill")
        kept_sink = 0 if cut else cache.sink_chunks  # a cut keeps no sink: the old prompt's content would go on
        new_origin = next_start - (len(recent) + kept_sink) * c
        # the scalar shifted in place, so that it keeps its placement (and the executables their key)
        cache = cache.replace(origin_frame=cache.origin_frame + (new_origin - origin))
        for start, latents, is_context in recent:
            fill = self._context_fn if is_context else self._fill_fn
            cache = fill(params, latents, cache, text, jnp.asarray(start, jnp.int32), rope)
        return cache, new_origin

    def first_step_for_strength(self, strength: float) -> int:
        """`first_step_for_strength` for this sampler's schedule."""
        return first_step_for_strength(strength, len(self.timesteps))

    def noise_to_step(self, latents: jax.Array, noise: jax.Array, first_step: int) -> jax.Array:
        """Clean latents noised to the level of denoising step `first_step`: (1 - sigma) x + sigma eps."""
        sigma = float(self.sigmas[first_step])
        return (1.0 - sigma) * latents.astype(jnp.float32) + sigma * noise.astype(jnp.float32)

    def stream(
        self,
        params: Params,
        text: TextKV,
        noise: jax.Array,
        key: jax.Array | None,
        start_frame: int = 0,
        rope: RopeTables | None = None,
        cache: KVCache | None = None,
        fill_last_chunk: bool = False,
        step_noise: jax.Array | None = None,
        context: jax.Array | None = None,
        first_step: int = 0,
        text_for_chunk: Callable[[int], TextKV | None] | None = None,
        recache: bool = True,
        recache_chunks: int | None = None,
    ) -> Iterator[jax.Array]:
        """Yield each finished latent chunk [B, c, H, W, C] as soon as it is denoised.

        noise: the initial noise of the whole video [B, F, H, W, C] (F a multiple of frames_per_chunk);
        key: seeds the re-noising draws (`step_noise` below); start_frame: the global latent frame of
        the stream's first chunk.
        rope, cache: may be made ahead by the caller (`dit.rope_tables`, `init_cache`), so that their
        setup is not on the path to the first frame; the cache is consumed (donated).
        fill_last_chunk: also run the last chunk's cache-fill pass, whose keys no chunk of this stream
        reads (the latents are the same either way; Self-Forcing's loop runs it: 5 forwards per chunk).
        step_noise: the re-noising draws given instead of drawn from `key` (then key may be None), e.g.
        PyTorch's, to reproduce a Self-Forcing run: [chunks, steps - 1, B, c, H, W, C], entry [i, k] the
        eps that re-noises chunk i's x0 after denoising step k (Self-Forcing's `torch.randn_like` after
        each step but the last; convert from its [B, c, C, H, W] with `from_torch_layout`).
        context: clean latents [B, P, H, W, C] (P a multiple of frames_per_chunk: an encoded image or
        clip) run chunk by chunk at t=0 into the cache at frames start_frame .. start_frame + P - 1, as
        Self-Forcing's `initial_latent`; the generated chunks follow from frame start_frame + P (they
        are what is yielded; the cache and RoPE tables then cover P + F frames).
        first_step: start every chunk at this step of the schedule, `noise` holding the chunks at its
        noise level (video-to-video: `noise_to_step`); 0 starts from pure noise.
        text_for_chunk: prompt switching. Called with i = 1, 2, ... once the chunk before has been
        handed out, before chunk i (counted from the first generated one) is denoised: a new prompt's
        TextKV (the shape of `text`), from which chunk i on attend to it, or None to keep the current
        one. A chunk's cache fill runs with the text it was denoised with, so without a re-cache the
        cache keeps the keys made under the old prompt.
        recache: at a switch, re-cache (`kv_recache`): the last clean chunks run again at t=0 with the
        new text into the cache (in place of the plain fill of the chunk before), the sink kept; the
        cache then holds what a stream with the new prompt from those chunks on would hold, and chunks
        older than them are dropped. recache_chunks: how many (default, and at most, what a chunk
        attends: `recache_limit`; fewer where fewer have been made since the sink or the last re-cache;
        0: a cut, the next chunk starts afresh: it sees nothing earlier, not even the sink, and is the
        new stream's sink). Only then are the last clean chunks kept (on the
        device, that many).
        """
        b, f, h, w, ch = noise.shape
        if ch != self.dit.config.in_dim:
            raise ValueError(f"noise must be [B, F, H, W, C] with {self.dit.config.in_dim} channels, got {noise.shape}")
        if text.k.shape[1] != b:
            raise ValueError(f"text batch {text.k.shape[1]} does not match the noise batch {b}")
        if start_frame < 0:
            raise ValueError(f"start_frame must be >= 0, got {start_frame}")
        chunks = self.inference.num_chunks(f)
        c = self.inference.frames_per_chunk
        n = len(self.timesteps)
        if not 0 <= first_step < n:
            raise ValueError(f"first_step must be in [0, {n - 1}] for a {n}-step schedule, got {first_step}")
        p = 0
        if context is not None:
            p = context.shape[1]
            if context.ndim != 5 or (context.shape[0], *context.shape[2:]) != (b, h, w, ch) or p == 0 or p % c:
                raise ValueError(
                    f"context must be clean latents [B, P, H, W, C] = [{b}, P, {h}, {w}, {ch}] with P a positive "
                    f"multiple of frames_per_chunk={c}, got {tuple(context.shape)}"
                )
        if step_noise is not None:
            want = (chunks, n - 1, b, c, h, w, ch)
            if tuple(step_noise.shape) != want:
                raise ValueError(
                    f"step_noise must be [chunks, steps - 1, B, c, H, W, C] = {want}, got {tuple(step_noise.shape)}"
                )
        elif key is None:
            raise ValueError("give a key for the re-noising draws, or the draws themselves as step_noise")
        total = p + f
        if rope is None:
            rope = self.dit.rope_tables(start_frame + total, h, w)
        elif rope.max_frames < start_frame + total:
            raise ValueError(f"RoPE tables cover {rope.max_frames} frames, the stream needs {start_frame + total}")
        if cache is None:
            cache = self.init_cache(b, total, h, w, start_frame)
        else:
            expected = jax.eval_shape(lambda: self.init_cache(b, total, h, w, start_frame))
            # the static fields (slots, sink and window frames) live in the tree structure
            if (cache.k.shape, jax.tree.structure(cache)) != (expected.k.shape, jax.tree.structure(expected)):
                raise ValueError(
                    f"the given KV cache does not fit this stream: shape {cache.k.shape} with "
                    f"{cache.capacity} slots, sink {cache.sink_frames} / window {cache.window_frames} "
                    f"frames; it needs {expected.k.shape} with {expected.capacity} slots, sink "
                    f"{expected.sink_frames} / window {expected.window_frames} (make it with init_cache)"
                )
            cache = cache.replace(origin_frame=jnp.asarray(start_frame, jnp.int32))
        recaching = text_for_chunk is not None and recache
        window = self.recache_limit(total, recache_chunks) if recaching else 0  # their clean latents are kept
        recent: collections.deque[tuple[int, jax.Array, bool]] = collections.deque(maxlen=window)
        origin = start_frame  # the cache's origin_frame on the host (a re-cache moves it)
        if context is not None:
            cache = self.prefill(params, text, context, cache, start_frame, rope)
            for j in range(p // c if window else 0):
                recent.append((start_frame + j * c, context[:, j * c : (j + 1) * c], True))
        for i in range(chunks):
            if step_noise is None:
                eps = draw_step_noise(key, i, (b, c, h, w, ch), n)
            else:  # at least one row: a 1-step schedule re-noises nothing (its row is never read)
                eps = step_noise[i] if n > 1 else jnp.zeros((1, b, c, h, w, ch), jnp.float32)
            start = jnp.asarray(start_frame + p + i * c, jnp.int32)
            x0, cache = self._denoise_fn(
                params, noise[:, i * c : (i + 1) * c], eps, cache, text, start, rope, first_step=first_step
            )
            # Hand the chunk over before its cache-fill pass is queued: whatever the consumer
            # dispatches now (the VAE decode) runs first, so frames reach the screen one forward sooner.
            yield x0
            new_text = None if text_for_chunk is None or i + 1 == chunks else text_for_chunk(i + 1)
            if new_text is None:
                if window:
                    recent.append((start_frame + p + i * c, x0, False))
                if i + 1 < chunks or fill_last_chunk:
                    cache = self._fill_fn(params, x0, cache, text, start, rope)
                continue
            if (new_text.k.shape, new_text.v.shape) != (text.k.shape, text.v.shape):
                raise ValueError(
                    f"text_for_chunk({i + 1}) gave a TextKV of shape {new_text.k.shape}, the stream's is {text.k.shape}"
                )
            recent.append((start_frame + p + i * c, x0, False))
            next_start = start_frame + p + (i + 1) * c
            made = (next_start - origin) // c - cache.sink_chunks  # since the sink (or the last re-cache)
            if recaching and recache_chunks == 0:  # a cut: a new stream from the next chunk
                cache, origin = self.kv_recache(params, new_text, [], cache, origin, next_start, rope, cut=True)
            elif recaching and made > 0:
                redo = list(recent)[len(recent) - min(window, made) :]
                cache, origin = self.kv_recache(params, new_text, redo, cache, origin, next_start, rope)
            else:  # no re-cache (or only sink chunks so far): the chunk's keys under its own prompt
                cache = self._fill_fn(params, x0, cache, text, start, rope)
            text = new_text
        jax.block_until_ready(cache)  # the stream ends when its last cache fill has run

    def generate(self, params: Params, text: TextKV, noise: jax.Array, key: jax.Array | None, *args, **kw) -> jax.Array:
        """All latents of the video [B, F, H, W, C] (float32); the other arguments as `stream`'s."""
        return jnp.concatenate(list(self.stream(params, text, noise, key, *args, **kw)), axis=1)


def initial_noise(
    key: jax.Array, batch: int, num_frames: int, latent_height: int, latent_width: int, channels: int = 16
) -> jax.Array:
    """Seeded starting noise [B, F, H, W, C] (float32)."""
    return jax.random.normal(key, (batch, num_frames, latent_height, latent_width, channels), jnp.float32)


__all__ = ["SelfForcingSampler", "draw_step_noise", "first_step_for_strength", "initial_noise"]
