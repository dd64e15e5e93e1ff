"""`causal-dit bench`: time the DiT rollout (per chunk, first chunk, frames per second) for a preset,
and optionally the product's loop end to end with each decoder.

Random weights of the preset's shapes; the prompt is a random text context. Numbers are printed as
a table and optionally written as JSON (`results.write_json`). No numbers here are asserted anywhere.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from causal_dit_jax.autoencoders.wan_vae import get_vae_preset
from causal_dit_jax.bench.flops import rollout_flops
from causal_dit_jax.bench.results import device_kind
from causal_dit_jax.bench.timing import CompileCounter, matmul_peak_tflops, peak_memory_gb
from causal_dit_jax.model.config import PRESETS, InferenceConfig, ModelConfig, get_preset
from causal_dit_jax.model.dit import CausalWanDiT, unstack_blocks
from causal_dit_jax.model.sampler import SelfForcingSampler, initial_noise


def _breakdown(b: dict) -> str:
    """One profiled forward's kernel time by kind, ms."""
    return (
        f"matmul {b['matmul']:.1f}  attention {b['attention']:.1f}  collective {b.get('collective', 0.0):.1f}  "
        f"other {b['other']:.1f}  total {b['total']:.1f}"
    )


@dataclasses.dataclass
class BenchResult:
    """One `run_dit_bench` run: times in the unit of each name's suffix (_s, _ms); `table()` for people,
    `as_dict()` for `results.write_json`; `compare.measured_figures` reads a peer comparison's figures."""

    preset: str
    device: str
    backend: str
    num_devices: int
    strategy: str
    latent_shape: tuple[int, ...]
    video_frames: int
    forwards: int
    compile_s: float
    chunk_ms: list[float]
    first_chunk_ms: float
    total_s: float
    frames_per_second: float
    comm_bytes_per_chunk: int | None = None
    dit_tflops: float = 0.0  # analytic FLOPs of all forwards (causal_dit_jax.bench.flops)
    matmul_peak_tflops: float | None = None  # bf16 8192^3 matmul rate measured in the same run (GPU;
    # `timing.matmul_peak_tflops`: dependent products inside one call)
    mfu: float | None = None  # of num_devices x the matmul peak
    compilations: int | None = None  # backend compilations during the timed rollouts
    peak_memory_gb: float | None = None  # device peak after the DiT rollouts (compilation included:
    # cuDNN autotuning allocates scratch; a run with a warm --compilation-cache shows the runtime peak)
    forward_breakdown_ms: dict | None = None  # one chunk forward (last chunk's cache), from a profile
    first_forward_breakdown_ms: dict | None = None  # one forward of the first chunk (no cache yet)
    rollout_kernel_ms: float | None = None  # device kernel time of one whole profiled rollout
    # (wall time minus this is the device's idle time: launch gaps and host syncs between chunks)
    vae: dict | None = None  # end to end with the Wan VAE streaming decode (see run_e2e)
    tiny_vae: dict | None = None  # end to end with the tiny TAEHV decoder
    linear_precision: str = "bfloat16"  # the DiT's block GEMMs: bfloat16 or float8 (e4m3)
    host: str = ""
    # the last timed rollout's latents [B, F, H, W, C] on the host (keep_latents=True; not in the JSON)
    latents: object | None = dataclasses.field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        """The JSON-able fields (the latents left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "latents"}

    def table(self) -> str:
        rows = [
            ("device", f"{self.device} x{self.num_devices} ({self.backend}), strategy {self.strategy}"),
            ("latents [B,F,H,W,C]", str(self.latent_shape)),
            ("DiT block GEMMs", self.linear_precision),
            ("DiT forwards", str(self.forwards)),
            ("compile (first chunk call)", f"{self.compile_s:.2f} s"),
            ("per chunk (ms)", " ".join(f"{t:.1f}" for t in self.chunk_ms)),
            ("first-chunk latency", f"{self.first_chunk_ms:.1f} ms"),
            ("DiT total", f"{self.total_s:.3f} s"),
            ("video frames / s (DiT only)", f"{self.frames_per_second:.2f}"),
        ]
        rows.append(("DiT TFLOP (analytic)", f"{self.dit_tflops:.1f}"))
        if self.matmul_peak_tflops:
            rows.append(("bf16 matmul peak", f"{self.matmul_peak_tflops:.0f} TFLOP/s"))
            rows.append(("MFU", f"{100 * self.mfu:.1f}%"))
        if self.compilations is not None:
            rows.append(("compilations in timed rollouts", str(self.compilations)))
        if self.peak_memory_gb is not None:
            rows.append(("peak device memory", f"{self.peak_memory_gb:.2f} GB"))
        if self.forward_breakdown_ms:
            rows.append(("one forward, profiled (ms per GPU)", _breakdown(self.forward_breakdown_ms)))
            for name, ms in list(self.forward_breakdown_ms.get("top_kernels", {}).items())[:12]:
                rows.append(("  kernel", f"{ms:7.3f} ms  {name[:90]}"))
        if self.first_forward_breakdown_ms:
            rows.append(("first chunk's forward, profiled", _breakdown(self.first_forward_breakdown_ms)))
        if self.rollout_kernel_ms is not None:
            idle = 1e3 * self.total_s - self.rollout_kernel_ms
            rows.append(("kernel time of one rollout", f"{self.rollout_kernel_ms:.1f} ms (device idle {idle:.1f} ms)"))
        for label, v in (("VAE", self.vae), ("tiny decoder", self.tiny_vae)):
            if not v:
                continue
            rows.append((f"{label} decode, streaming (ms/chunk)", " ".join(f"{t:.1f}" for t in v["decode_ms"])))
            rows.append(
                (
                    f"{label} decode total",
                    f"{v['decode_total_s']:.3f} s ({v['vae_preset']}, {v['vae_dtype']}, "
                    f"{v['latents_per_call']} latents per call)",
                )
            )
            rows.append((f"first frame with {label} (encoded prompt -> host)", f"{1e3 * v['first_frame_s']:.1f} ms"))
            rows.append((f"end to end, DiT + {label}", f"{v['e2e_s']:.3f} s = {v['e2e_fps']:.1f} frames/s"))
            if v.get("e2e_fps_sequential") is not None:
                rows.append(("  without running a chunk ahead", f"{v['e2e_fps_sequential']:.1f} frames/s"))
            for loop, d in (v.get("device_idle_ms") or {}).items():
                rows.append(
                    (f"  device idle, {loop} loop", f"{d['idle_ms']:.1f} ms of {d['span_ms']:.1f} ms ({d['gaps']:.0f} gaps)")
                )
            if v.get("peak_memory_gb") is not None:
                rows.append((f"peak device memory, DiT + {label}", f"{v['peak_memory_gb']:.2f} GB"))
        if self.comm_bytes_per_chunk is not None:
            rows.append(("bytes communicated per chunk", f"{self.comm_bytes_per_chunk:,}"))
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def run_dit_bench(
    preset: str | ModelConfig = "demo",
    latent_frames: int = 9,
    height: int = 128,
    width: int = 128,
    inference: InferenceConfig = InferenceConfig(),
    dit: CausalWanDiT | None = None,
    strategy: str = "single",
    seed: int = 0,
    comm_bytes_per_chunk: int | None = None,
    repeats: int = 1,
    profile: bool = False,
    e2e_vae: str | None = None,
    vae_latents_per_call: int = 1,
    keep_latents: bool = False,
    per_layer_weights: bool = False,
    banded_decode: bool = False,
    decode_devices: Sequence[jax.Device] | None = None,
) -> BenchResult:
    """Roll out a video with random weights and time each chunk (after a warm-up rollout).

    height, width: pixels; the latents are the Wan VAE's (`VAEConfig.spatial_factor`), the video frames
    its `num_frames(latent_frames)`. e2e_vae: a Wan VAE preset ('wan2.1', 'tiny') whose product loop
    (`run_e2e`) also runs, after the TAEHV decoder's of the same size.
    per_layer_weights: run on `unstack_blocks(params)`.
    dit: a CausalWanDiT, or a sharding.SequenceParallelDiT (its inputs are then replicated over its
    mesh and the decoders of `e2e_vae` run on the first device, or with banded_decode the Wan VAE in
    bands of rows over the mesh, as the pipeline does by default). decode_devices: the decoders' own
    devices, none of the DiT's (the pipeline's `decode_devices`: a 7 + 1 split); the Wan VAE in bands
    of rows over them with banded_decode and several of them, else on the first."""
    config = get_preset(preset) if isinstance(preset, str) else preset
    name = (
        preset
        if isinstance(preset, str)
        else next((k for k, v in PRESETS.items() if v == config), f"custom (residual {config.residual_dtype})")
    )
    vae_config = get_vae_preset(e2e_vae or "wan2.1")
    down = vae_config.spatial_factor
    multiple = down * config.patch_size[1], down * config.patch_size[2]
    if height % multiple[0] or width % multiple[1]:
        raise ValueError(
            f"height and width must be multiples of {multiple[0]}x{multiple[1]} (the VAE's x{down} "
            f"and the DiT's patches), got {height}x{width}"
        )
    lh, lw = height // down, width // down
    frames = vae_config.num_frames(latent_frames)
    dit = dit or CausalWanDiT(config)
    sampler = SelfForcingSampler(dit, inference)
    forwards_per_chunk = sampler.forwards_per_chunk  # the denoising steps, then the cache fill
    key = jax.random.key(seed)
    params = jax.jit(dit.init)(key)
    if per_layer_weights:  # one buffer per layer's weight (`unstack_blocks`): no per-layer slice copies
        params = unstack_blocks(params)
    ctx = jax.random.normal(jax.random.fold_in(key, 1), (1, config.text_len, config.text_dim), jnp.float32)
    text = jax.jit(dit.encode_text)(params, ctx)
    noise = initial_noise(jax.random.fold_in(key, 2), 1, latent_frames, lh, lw, config.in_dim)
    params, text, noise = dit.place((params, text, noise))  # replicated over a mesh, if any

    t0 = time.perf_counter()
    stream = sampler.stream(params, text, noise, key)
    next(stream).block_until_ready()
    compile_s = time.perf_counter() - t0  # the first chunk's call: compile + run
    for x0 in stream:  # warm-up: the cache-fill call compiles at the first chunk's end
        x0.block_until_ready()

    counter = CompileCounter()
    counter.active = True
    best: list[float] | None = None
    rope = dit.rope_tables(latent_frames, lh, lw)
    for _ in range(max(repeats, 1)):
        times, chunks = [], []
        cache = jax.block_until_ready(sampler.init_cache(1, latent_frames, lh, lw))  # made ahead, as the pipeline does
        t_prev = time.perf_counter()
        for x0 in sampler.stream(params, text, noise, key, rope=rope, cache=cache, fill_last_chunk=True):
            x0.block_until_ready()
            now = time.perf_counter()
            times.append((now - t_prev) * 1e3)
            chunks.append(x0)
            t_prev = now
        times[-1] += (time.perf_counter() - t_prev) * 1e3  # the last chunk's cache fill
        if best is None or sum(times) < sum(best):
            best = times
    counter.active = False
    latents = None
    if keep_latents:
        import numpy as np

        latents = np.concatenate([np.asarray(c) for c in chunks], axis=1)
    del chunks
    dit_peak = peak_memory_gb()  # before the decoders run (the counter only grows)
    vae_result = tiny_result = None
    if e2e_vae:  # the small decoder first, so each peak is its own (the Wan VAE's is the larger)
        tiny_result = run_e2e(
            sampler,
            params,
            text,
            noise,
            key,
            "taehv" if e2e_vae == "wan2.1" else "taehv-tiny",
            latents_per_call=vae_latents_per_call,
            decode_device=decode_devices[0] if decode_devices else None,
        )
        decode_mesh, decode_device = (getattr(dit, "mesh", None) if banded_decode else None), None
        if decode_devices:
            from causal_dit_jax.sharding.decode_bands import decoder_mesh

            if banded_decode and len(decode_devices) > 1:
                decode_mesh = decoder_mesh(decode_devices)
            else:
                decode_mesh, decode_device = None, decode_devices[0]
        vae_result = run_e2e(
            sampler,
            params,
            text,
            noise,
            key,
            e2e_vae,
            latents_per_call=vae_latents_per_call,
            decode_mesh=decode_mesh,
            decode_device=decode_device,
        )
    total = sum(best) / 1e3
    n_chunks = len(best)
    tpc = inference.frames_per_chunk * config.tokens_per_frame(lh, lw)
    flops = rollout_flops(
        config,
        tpc,
        n_chunks,
        forwards_per_chunk,
        window_frames=inference.local_attn_size,
        frames_per_chunk=inference.frames_per_chunk,
    )
    peak = matmul_peak_tflops() if jax.default_backend() == "gpu" else None
    n_devices = dit.num_devices  # MFU against the peak of all of them
    breakdown = first_breakdown = rollout_ms = None
    if profile and jax.default_backend() == "gpu":
        from causal_dit_jax.bench.profile import profile_breakdown

        fwd = jax.jit(dit.forward, donate_argnums=(4,))  # the cache is donated, as in the sampler
        x = noise[:, : inference.frames_per_chunk]
        t = jnp.full(x.shape[:2], 937.5)

        def forward_at(start: int):
            state = {"cache": sampler.init_cache(1, latent_frames, lh, lw)}

            def one_forward():
                out, state["cache"] = fwd(params, x, t, text, state["cache"], start, rope)
                return out

            jax.block_until_ready(one_forward())
            return one_forward

        breakdown = profile_breakdown(forward_at(latent_frames - inference.frames_per_chunk))
        first_breakdown = profile_breakdown(forward_at(0))
        del fwd

        def one_rollout():
            cache = sampler.init_cache(1, latent_frames, lh, lw)
            return list(sampler.stream(params, text, noise, key, rope=rope, cache=cache, fill_last_chunk=True))

        rollout_ms = profile_breakdown(one_rollout, repeats=1)["total"]
    result = BenchResult(
        preset=name,
        device=device_kind(),
        backend=jax.default_backend(),
        num_devices=n_devices,
        strategy=strategy,
        latent_shape=tuple(noise.shape),
        video_frames=frames,
        forwards=n_chunks * forwards_per_chunk,
        compile_s=compile_s,
        chunk_ms=best,
        first_chunk_ms=best[0],
        total_s=total,
        frames_per_second=frames / total,
        comm_bytes_per_chunk=comm_bytes_per_chunk,
        dit_tflops=flops / 1e12,
        matmul_peak_tflops=peak,
        mfu=None if peak is None else flops / total / 1e12 / (peak * n_devices),
        compilations=counter.count,
        peak_memory_gb=dit_peak,
        forward_breakdown_ms=breakdown,
        first_forward_breakdown_ms=first_breakdown,
        rollout_kernel_ms=rollout_ms,
        vae=vae_result,
        tiny_vae=tiny_result,
        linear_precision=dit.kernels.linear_precision,
        host=platform.node(),
        latents=latents,
    )
    return result


def run_e2e(
    sampler: SelfForcingSampler,
    params,
    text,
    noise,
    key,
    vae_preset: str = "wan2.1",
    vae_dtype: str = "bfloat16",
    latents_per_call: int = 3,
    decode_mesh=None,
    idle: bool | None = None,
    decode_device: jax.Device | None = None,
) -> dict:
    """The product's loop: each latent chunk decoded as soon as it is denoised (`latents_per_call`
    latents per decode call, `LatentChunkDecoder`), frames copied to the host. vae_preset: a Wan VAE
    preset ('wan2.1', 'tiny') or the TAEHV decoder ('taehv' = taew2_1's shapes, 'taehv-tiny').
    decode_mesh: a sequence-parallel mesh over which a Wan VAE decodes in bands of rows
    (`sharding.decode_bands.BandedWanVAE`, as the pipeline does with a mesh); None: one device,
    `decode_device` (a device of its own, beside the DiT's) or else the default one. Random
    decoder weights; one warm-up stream, one timed as the product runs (first frame, end to end: one
    chunk ahead, chunk i + 1's DiT queued before chunk i's frames are pulled, as
    `TextToVideoPipeline.stream` does), one timed without running ahead (e2e_fps_sequential: the host
    pulls each chunk's frames before it queues the next chunk), one that waits for each chunk's
    latents (decode_ms: each chunk's decode alone). first_frame_s: stream start (the prompt encoded;
    the KV cache and RoPE tables made ahead, as the pipeline does) to the first frames on the host.
    idle (default: on GPUs): profile one stream of each loop and report the device's idle time between
    its first and last kernel (`device_idle_ms`: 'ahead', 'sequential'), the overlap's effect."""
    import numpy as np

    from causal_dit_jax.autoencoders.chunked_decode import LatentChunkDecoder
    from causal_dit_jax.autoencoders.taehv import TAEHVDecoder, get_taehv_preset
    from causal_dit_jax.autoencoders.wan_vae import WanVAE
    from causal_dit_jax.model.random_params import random_params

    if vae_preset.startswith("taehv"):
        preset = "taew2.1" if vae_preset == "taehv" else vae_preset.removeprefix("taehv-")
        vae = TAEHVDecoder(get_taehv_preset(preset).replace(dtype=vae_dtype, param_dtype=vae_dtype))
    else:
        vae = WanVAE(get_vae_preset(vae_preset).replace(dtype=vae_dtype, param_dtype=vae_dtype))
    vae_params = random_params(vae.abstract_params(), 7)
    banded = decode_mesh is not None and isinstance(vae, WanVAE)
    if banded:
        from causal_dit_jax.sharding.decode_bands import BandedWanVAE

        vae = BandedWanVAE(vae, decode_mesh)
        vae_params = vae.place(vae_params)  # replicated on the mesh once
    elif decode_device is not None:
        vae_params = jax.device_put(vae_params, decode_device)
    decoder = LatentChunkDecoder(vae, latents_per_call)
    b, f, h, w, _ = noise.shape
    rope = sampler.dit.rope_tables(f, h, w)

    def one_stream(sync: bool = False, ahead: bool = True):
        """The product's loop (`TextToVideoPipeline.stream`): no host waits but for the frames, and with
        `ahead` chunk i + 1's DiT queued before chunk i's frames are pulled; sync waits for each chunk's
        latents (no overlap), to time its decode alone."""
        cache = decoder.init_cache(b, h, w)
        if decode_device is not None and not banded:
            cache = jax.device_put(cache, decode_device)
        kv_cache = jax.block_until_ready(sampler.init_cache(b, f, h, w))  # made before the prompt, as the pipeline does
        t0 = time.perf_counter()
        first, dec, frames = None, [], 0
        chunks = sampler.stream(params, text, noise, key, rope=rope, cache=kv_cache)
        run_ahead = ahead and not sync
        pending = next(chunks, None)
        while pending is not None:
            latents = pending
            if sync:
                jax.block_until_ready(latents)
            td = time.perf_counter()
            queued, cache = decoder(vae_params, latents, cache)
            if run_ahead:
                pending = next(chunks, None)  # the next chunk's DiT queued before these frames are pulled
            for pixels in queued:
                frames += np.asarray(pixels).shape[1]
                if first is None:
                    first = time.perf_counter() - t0
            dec.append((time.perf_counter() - td) * 1e3)
            if not run_ahead:
                pending = next(chunks, None)
        return first, dec, time.perf_counter() - t0, frames

    one_stream()  # compile
    first, _, total, frames = one_stream()
    _, _, total_seq, _ = one_stream(ahead=False)
    _, dec, _, _ = one_stream(sync=True)
    idle_ms = None
    if idle or (idle is None and jax.default_backend() == "gpu"):
        from causal_dit_jax.bench.profile import device_idle

        loops = (("ahead", True), ("sequential", False))
        idle_ms = {name: device_idle(lambda a=a: one_stream(ahead=a)[2]) for name, a in loops}
    return {
        "vae_preset": vae_preset,
        "vae_dtype": vae_dtype,
        "banded_decode_devices": vae.devices if banded else 1,
        "decode_devices": sorted(d.id for d in jax.tree.leaves(vae_params)[0].devices()),
        "latents_per_call": latents_per_call,
        "decode_ms": dec,
        "decode_total_s": sum(dec) / 1e3,
        "first_frame_s": first,
        "e2e_s": total,
        "e2e_fps": frames / total,
        "e2e_fps_sequential": frames / total_seq,
        "device_idle_ms": idle_ms,
        "frames": frames,
        "peak_memory_gb": peak_memory_gb(),
    }


__all__ = ["BenchResult", "run_dit_bench", "run_e2e"]
