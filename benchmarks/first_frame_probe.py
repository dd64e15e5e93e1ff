"""GPU probe: where the first frame's latency goes (real Wan2.1-1.3B shapes, 480x832, random bf16
weights): each step from an encoded prompt to the first decoded frame on the host, timed alone
with a device sync after it, after a warm-up of the same sequence.

    python benchmarks/first_frame_probe.py [--decoder wan|taehv] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.bench.rollout import write_probe_json
from causal_dit_jax.model.config import InferenceConfig, get_preset
from causal_dit_jax.model.random_params import random_params
from causal_dit_jax.model.dit import CausalWanDiT
from causal_dit_jax.model.sampler import SelfForcingSampler, initial_noise, step_noise
from causal_dit_jax.decoders.taehv import TAEHVDecoder, get_taehv_preset
from causal_dit_jax.decoders.chunked_decode import to_uint8
from causal_dit_jax.decoders.wan_vae import WanVAE, get_vae_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder", default="wan", choices=["wan", "taehv"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--vae-preset", default=None, help="default: the real size of --decoder")
    ap.add_argument("--latent-size", default="60x104", help="latent HxW (480x832 video: 60x104)")
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    lh, lw = (int(v) for v in args.latent_size.split("x"))
    dit = CausalWanDiT(cfg)
    inference = InferenceConfig()
    sampler = SelfForcingSampler(dit, inference)
    key = jax.random.key(0)
    params = jax.jit(dit.init)(key)
    text = jax.jit(dit.encode_text)(params, jax.random.normal(key, (1, cfg.text_len, cfg.text_dim)))
    noise = initial_noise(jax.random.fold_in(key, 2), 1, 21, lh, lw)
    if args.decoder == "wan":
        vae = WanVAE(get_vae_preset(args.vae_preset or "wan2.1").replace(dtype="bfloat16", param_dtype="bfloat16"))
    else:
        vae = TAEHVDecoder(get_taehv_preset(args.vae_preset or "taew2.1").replace(dtype="bfloat16",
                                                                                  param_dtype="bfloat16"))
    vae_params = random_params(vae.abstract_params(), 7)
    decode = jax.jit(lambda p, z, c: (lambda f, c2: (to_uint8(f), c2))(*vae.decode_chunk(p, z, c)), donate_argnums=(2,))
    steps = {}

    def step(name, fn):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        steps[name] = steps.get(name, 0.0) + 1e3 * (time.perf_counter() - t0)
        return out

    for _ in range(2):  # the first pass compiles; the second is reported
        steps.clear()
        t_start = time.perf_counter()
        rope = step("rope tables (host, then device)", lambda: dit.rope_tables(21, lh, lw))
        kv = step("KV cache zeros", lambda: sampler.init_cache(1, 21, lh, lw))
        vcache = step("decoder cache zeros", lambda: vae.init_decode_cache(1, lh, lw))
        eps = step("re-noising draws", lambda: step_noise(key, 0, (1, 3, lh, lw, 16), len(sampler.timesteps)))
        x0, kv = step("denoise chunk 0 (4 forwards)", lambda: sampler._denoise_fn(
            params, noise[:, :3], eps, kv, text, jnp.asarray(0, jnp.int32), rope))
        pixels, vcache = step("decode latent 0", lambda: decode(vae_params, x0[:, :1], vcache))
        step("to host", lambda: np.asarray(pixels))
        total = 1e3 * (time.perf_counter() - t_start)
        jax.block_until_ready(sampler._fill_fn(params, x0, kv, text, jnp.asarray(0, jnp.int32), rope))
    steps["total (with the syncs)"] = total
    for k, v in steps.items():
        print(f"{k:40s} {v:8.2f} ms")
    if args.json:
        write_probe_json(args.json, decoder=args.decoder, ms=steps)


if __name__ == "__main__":
    main()
