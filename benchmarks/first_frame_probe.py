"""GPU probe: where the first frame's latency goes (real Wan2.1-1.3B shapes, 480x832, random bf16
weights): each step from an encoded prompt to the first decoded frame on the host, timed alone
with a device sync after it, after a warm-up of the same sequence.

    python benchmarks/first_frame_probe.py [--decoder wan|taehv] [--json out.json]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.autoencoders.chunked_decode import LatentChunkDecoder
from causal_dit_jax.autoencoders.taehv import TAEHVDecoder, get_taehv_preset
from causal_dit_jax.autoencoders.wan_vae import WanVAE, get_vae_preset
from causal_dit_jax.bench import timed_ms, write_json
from causal_dit_jax.model.config import InferenceConfig, get_preset
from causal_dit_jax.model.dit import CausalWanDiT
from causal_dit_jax.model.random_params import random_params
from causal_dit_jax.model.sampler import SelfForcingSampler, draw_step_noise, initial_noise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder", default="wan", choices=["wan", "taehv"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--vae-preset", default=None, help="default: the real size of --decoder")
    ap.add_argument("--latent-size", default="60x104", help="latent HxW (480x832 video: 60x104)")
    ap.add_argument("--latent-frames", type=int, default=21, help="latent frames of the video (21: 81 frames)")
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    lh, lw = (int(v) for v in args.latent_size.split("x"))
    frames = args.latent_frames
    dit = CausalWanDiT(cfg)
    inference = InferenceConfig()
    sampler = SelfForcingSampler(dit, inference)
    c, steps_n = inference.frames_per_chunk, len(sampler.timesteps)
    # the sampler's two calls, jitted here as its stream jits them (the caches donated)
    denoise = jax.jit(sampler.denoise, donate_argnums=(3,))
    fill = jax.jit(sampler.fill_cache, donate_argnums=(2,))
    key = jax.random.key(0)
    params = jax.jit(dit.init)(key)
    text = jax.jit(dit.encode_text)(params, jax.random.normal(key, (1, cfg.text_len, cfg.text_dim)))
    noise = initial_noise(jax.random.fold_in(key, 2), 1, frames, lh, lw, cfg.in_dim)
    if args.decoder == "wan":
        vae = WanVAE(get_vae_preset(args.vae_preset or "wan2.1").replace(dtype="bfloat16", param_dtype="bfloat16"))
    else:
        vae = TAEHVDecoder(get_taehv_preset(args.vae_preset or "taew2.1").replace(dtype="bfloat16", param_dtype="bfloat16"))
    vae_params = random_params(vae.abstract_params(), 7)
    decoder = LatentChunkDecoder(vae, latents_per_call=1)  # the product's decode loop, one latent per call
    start = jnp.asarray(0, jnp.int32)
    steps = {}

    def step(name, fn):
        out, ms = timed_ms(fn)
        steps[name] = steps.get(name, 0.0) + ms
        return out

    def first_frame():
        rope = step("rope tables (host, then device)", lambda: dit.rope_tables(frames, lh, lw))
        kv = step("KV cache zeros", lambda: sampler.init_cache(1, frames, lh, lw))
        vcache = step("decoder cache zeros", lambda: decoder.init_cache(1, lh, lw))
        eps = step("re-noising draws", lambda: draw_step_noise(key, 0, (1, c, lh, lw, cfg.in_dim), steps_n))
        x0, kv = step(
            f"denoise chunk 0 ({steps_n} forwards)", lambda: denoise(params, noise[:, :c], eps, kv, text, start, rope)
        )
        pixels, _ = step("decode latent 0", lambda: decoder(vae_params, x0[:, :1], vcache))
        step("to host", lambda: np.asarray(pixels[0]))
        return x0, kv, rope

    for _ in range(2):  # the first pass compiles; the second is reported
        steps.clear()
        (x0, kv, rope), total = timed_ms(first_frame)
        timed_ms(fill, params, x0, kv, text, start, rope)  # chunk 0's cache fill, after its first frame
    steps["total (with the syncs)"] = total
    for k, v in steps.items():
        print(f"{k:40s} {v:8.2f} ms")
    if args.json:
        write_json(args.json, decoder=args.decoder, ms=steps)


if __name__ == "__main__":
    main()
