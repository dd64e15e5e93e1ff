"""Text to video, end to end: tokenizer -> umT5 -> causal DiT (Self-Forcing) -> Wan VAE (or the tiny
TAEHV decoder), streaming.

Each latent chunk is decoded as soon as it is denoised, with the decoder's causal caches carried
between chunks, so the first frames exist long before the video is done.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.autoencoders.chunked_decode import LatentChunkDecoder
from causal_dit_jax.autoencoders.taehv import TAEHVConfig, TAEHVDecoder, get_taehv_preset
from causal_dit_jax.autoencoders.wan_vae import VAEConfig, WanVAE, get_vae_preset
from causal_dit_jax.checkpoint import read_checkpoint_config, restore_component
from causal_dit_jax.model.config import InferenceConfig, KernelConfig, ModelConfig, get_preset
from causal_dit_jax.model.dit import CausalWanDiT, Params, load_dit
from causal_dit_jax.model.kv_cache import TextKV
from causal_dit_jax.model.random_params import random_params
from causal_dit_jax.model.sampler import SelfForcingSampler, initial_noise
from causal_dit_jax.text.tokenizer import ByteTokenizer, PromptTokenizer
from causal_dit_jax.text.umt5 import T5Config, UMT5Encoder, get_t5_preset

COMPONENTS = ("dit", "t5")
DECODERS = {"wan": "vae", "taehv": "taehv"}  # --decoder name -> checkpoint component


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """A request's size: video frames, pixel height/width, and the matching latent shape."""

    frames: int
    height: int
    width: int
    latent_frames: int
    latent_height: int
    latent_width: int


def video_spec(
    frames: int, height: int, width: int, model: ModelConfig, decoder: VAEConfig | TAEHVConfig, frames_per_chunk: int
) -> VideoSpec:
    """Validate a frame count and resolution against the configs that own them: the decoder's
    temporal factor (frames = 1 + 4 (T - 1) for Wan's VAE), T latent frames a multiple of the chunk
    size (81 frames = 21 latents = 7 chunks), and height / width multiples of the decoder's spatial
    factor times the DiT's patch (8 x 2 = 16)."""
    s = decoder.spatial_factor
    _, ph, pw = model.patch_size
    if height <= 0 or width <= 0 or height % (s * ph) or width % (s * pw):
        raise ValueError(
            f"height and width must be positive multiples of {s * ph} (x{s} decoder, {ph}x{pw} patches), got {height}x{width}"
        )
    tf = decoder.temporal_factor
    if frames < 1 or (frames - 1) % tf:
        raise ValueError(
            f"{frames} frames do not fit the decoder: use 1 + {tf}k frames "
            f"(e.g. {decoder.num_frames(9)}, {decoder.num_frames(21)})"
        )
    latent = (frames - 1) // tf + 1
    if latent % frames_per_chunk:
        ok = [decoder.num_frames(frames_per_chunk * k) for k in range(1, 8)]
        raise ValueError(
            f"{frames} frames are {latent} latent frames, not a multiple of the chunk size "
            f"{frames_per_chunk}; valid frame counts: {ok} ..."
        )
    return VideoSpec(frames, height, width, latent, height // s, width // s)


def pipeline_configs(ckpt_dir: str | pathlib.Path | None, decoder: str = "wan") -> tuple[ModelConfig, VAEConfig | TAEHVConfig]:
    """The DiT's and the chosen decoder's configs, read without loading any weights: the embedded
    default's presets (ckpt_dir None) or a checkpoint's config.json."""
    _check_decoder(decoder)
    if ckpt_dir is None:
        return get_preset("demo"), get_vae_preset("tiny") if decoder == "wan" else get_taehv_preset("tiny")
    d = pathlib.Path(ckpt_dir).expanduser()
    meta = read_checkpoint_config(d)
    have = meta.get("components", [])
    missing = [c for c in COMPONENTS if c not in have]
    if missing:
        raise ValueError(
            f"checkpoint {d} is missing the {', '.join(missing)} model(s); convert with "
            "`causal-dit convert --checkpoint ... --wan-dir ...` to include all three"
        )
    if DECODERS[decoder] not in have:
        how = "--wan-dir" if decoder == "wan" else "--taehv taew2_1.pth"
        raise ValueError(
            f"checkpoint {d} has no {decoder!r} decoder (it has {sorted(have)}); convert with `causal-dit convert ... {how}`"
        )
    decoder_config = VAEConfig.from_dict(meta["vae"]) if decoder == "wan" else TAEHVConfig.from_dict(meta["taehv"])
    return ModelConfig.from_dict(meta["dit"]), decoder_config


class TextToVideoPipeline:
    """Holds the converted params (DiT, umT5, a video decoder), the tokenizer and optionally a mesh.

    vae: the video decoder, `WanVAE` (the full Wan2.1 VAE) or `TAEHVDecoder` (the tiny preview decoder);
    both stream with carried caches and give the same frame counts.

    mesh: a `sharding.make_mesh` mesh; the DiT then runs sequence-parallel over it (params replicated).
    vae_latents_per_call: latent frames per VAE decode call. 1 (default) gives the first frame soonest
    and the smallest activation memory; 3 decodes a whole chunk per call (a little more throughput,
    a later first frame and more memory: figures in benchmarks/NOTES.md).
    """

    def __init__(
        self,
        dit: CausalWanDiT,
        dit_params: Params,
        text_encoder: UMT5Encoder,
        t5_params: Params,
        tokenizer,
        vae: WanVAE | TAEHVDecoder,
        vae_params: Params,
        inference: InferenceConfig = InferenceConfig(),
        mesh=None,
        untrained: bool = False,
        vae_latents_per_call: int = 1,
    ):
        if text_encoder.config.dim != dit.config.text_dim:
            raise ValueError(f"text encoder width {text_encoder.config.dim} != DiT text_dim {dit.config.text_dim}")
        self.dit, self.text_encoder, self.tokenizer, self.vae = dit, text_encoder, tokenizer, vae
        self.dit_params, self.t5_params, self.vae_params = dit_params, t5_params, vae_params
        self.inference = inference
        self.untrained = untrained
        self.vae_latents_per_call = vae_latents_per_call
        self._chunk_decoder = LatentChunkDecoder(vae, vae_latents_per_call)  # checks the count
        self.mesh = mesh
        model = dit
        if mesh is not None:
            from causal_dit_jax.sharding import SequenceParallelDiT

            model = SequenceParallelDiT(dit, mesh)
            self.dit_params = jax.device_put(dit_params, model.replicated())
        self.model = model
        self.sampler = SelfForcingSampler(model, inference)
        text_len = dit.config.text_len
        self._encode = jax.jit(lambda p, ids, mask: text_encoder.text_context(p, ids[:, :text_len], mask[:, :text_len]))
        self._text_kv = jax.jit(model.encode_text)

    # ------------------------------------------------------------------ construction
    @classmethod
    def embedded_default(
        cls,
        inference: InferenceConfig = InferenceConfig(),
        mesh=None,
        seed: int = 0,
        decoder: str = "wan",
        kernels: KernelConfig = KernelConfig(),
    ) -> TextToVideoPipeline:
        """Small presets with deterministic random weights (untrained: the video is noise-like).
        Small enough for a laptop CPU (the README's first command: 33 frames at 128x192); every code
        path is the real model's.
        decoder: 'wan' (a narrow Wan VAE) or 'taehv' (a narrow TAEHV decoder); kernels: how the DiT's
        kernels run (`KernelConfig`; linear_precision='float8' runs its block GEMMs in e4m3)."""
        config, decoder_config = pipeline_configs(None, decoder)
        dit = CausalWanDiT(config, kernels)
        dit_params = dit.quantize(random_params(CausalWanDiT(config).abstract_params(), seed))
        t5 = UMT5Encoder(get_t5_preset("demo"))
        vae = WanVAE(decoder_config) if decoder == "wan" else TAEHVDecoder(decoder_config)
        return cls(
            dit,
            dit_params,
            t5,
            random_params(t5.abstract_params(), seed + 1),
            ByteTokenizer(max_length=t5.config.text_len),
            vae,
            random_params(vae.abstract_params(), seed + 2),
            inference,
            mesh,
            untrained=True,
        )

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str | pathlib.Path,
        inference: InferenceConfig = InferenceConfig(),
        mesh=None,
        decoder: str = "wan",
        kernels: KernelConfig = KernelConfig(),
    ) -> TextToVideoPipeline:
        """Load a folder written by `causal-dit convert` (DiT, umT5, VAE and the tokenizer).

        decoder: 'wan' decodes with the Wan2.1 VAE; 'taehv' with the tiny decoder (converted with
        `causal-dit convert ... --taehv taew2_1.pth`); only the chosen decoder is loaded.
        kernels: how the DiT's kernels run (`KernelConfig`; linear_precision='float8' quantises its block
        linears to e4m3 after loading)."""
        _, decoder_config = pipeline_configs(ckpt_dir, decoder)  # checks the components
        d = pathlib.Path(ckpt_dir).expanduser()
        meta = read_checkpoint_config(d)
        t5 = UMT5Encoder(T5Config.from_dict(meta["t5"]))
        vae = WanVAE(decoder_config) if decoder == "wan" else TAEHVDecoder(decoder_config)
        sharding = None
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            sharding = NamedSharding(mesh, PartitionSpec())
        dit, dit_params = load_dit(d, sharding, kernels)
        t5_params = restore_component(d, "t5", t5.abstract_params())
        vae_params = restore_component(d, DECODERS[decoder], vae.abstract_params())
        tok_dir = d / "tokenizer"
        if tok_dir.exists():
            tokenizer = PromptTokenizer.from_folder(tok_dir, max_length=t5.config.text_len)
        elif meta.get("tokenizer") == "bytes":
            tokenizer = ByteTokenizer(max_length=t5.config.text_len)
        else:
            raise ValueError(f"checkpoint {d} has no tokenizer/ folder")
        return cls(
            dit,
            dit_params,
            t5,
            t5_params,
            tokenizer,
            vae,
            vae_params,
            inference,
            mesh,
            untrained=bool(meta.get("untrained", False)),
        )

    # ------------------------------------------------------------------ pieces
    def video_spec(self, frames: int, height: int, width: int) -> VideoSpec:
        """`video_spec` against this pipeline's DiT, decoder and chunking."""
        return video_spec(frames, height, width, self.dit.config, self.vae.config, self.inference.frames_per_chunk)

    def encode_prompts(self, prompts: str | Sequence[str]) -> TextKV:
        """Tokenize, run umT5 once, and build the DiT's cross-attention K/V for the prompts."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompt given")
        tokens = self.tokenizer(prompts)
        context = self._encode(self.t5_params, jnp.asarray(tokens.ids), jnp.asarray(tokens.mask))
        return self._text_kv(self.dit_params, self._to_dit(context))

    def _to_dit(self, x):
        """Place an input of the DiT where its params live (replicated over the mesh, if any)."""
        return x if self.mesh is None else jax.device_put(x, self.model.replicated())

    def stream(
        self,
        prompts: str | Sequence[str],
        frames: int = 81,
        height: int = 480,
        width: int = 832,
        seed: int = 0,
        stats: dict | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield uint8 frames [B, n, H, W, 3] as soon as each VAE call decodes them: with one latent per
        call, 1 frame, then 4 per latent frame (with 3, 9 then 12 per chunk).

        stats, if given, receives 'first_frame_s' (prompt encoded -> first frames on the host) and
        'encode_s'.
        """
        spec = self.video_spec(frames, height, width)
        batch = 1 if isinstance(prompts, str) else len(prompts)
        # Prompt-independent setup first (queued on the device while the prompt is encoded).
        rope = self.model.rope_tables(spec.latent_frames, spec.latent_height, spec.latent_width)
        cache = self.sampler.init_cache(batch, spec.latent_frames, spec.latent_height, spec.latent_width)
        t0 = time.perf_counter()
        text = self.encode_prompts(prompts)
        jax.block_until_ready(text)
        t1 = time.perf_counter()
        key = jax.random.key(seed)
        noise = self._to_dit(
            initial_noise(
                jax.random.fold_in(key, 0),
                batch,
                spec.latent_frames,
                spec.latent_height,
                spec.latent_width,
                self.dit.config.in_dim,
            )
        )
        vae_cache = self._chunk_decoder.init_cache(batch, spec.latent_height, spec.latent_width)
        first = True
        for latents in self.sampler.stream(self.dit_params, text, noise, jax.random.fold_in(key, 1), rope=rope, cache=cache):
            queued, vae_cache = self._chunk_decoder(self.vae_params, latents, vae_cache)
            for pixels in queued:
                out = np.asarray(pixels)
                if stats is not None and first:
                    stats["encode_s"] = t1 - t0
                    stats["first_frame_s"] = time.perf_counter() - t1
                first = False
                yield out

    def generate(
        self, prompts: str | Sequence[str], frames: int = 81, height: int = 480, width: int = 832, seed: int = 0
    ) -> np.ndarray:
        """The whole video: uint8 [B, frames, H, W, 3]."""
        return np.concatenate(list(self.stream(prompts, frames, height, width, seed)), axis=1)


def save_pipeline_checkpoint(pipe: TextToVideoPipeline, out_dir: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
    """Write all three models (and a byte tokenizer marker or the tokenizer files) as one checkpoint."""
    from causal_dit_jax.checkpoint import save_checkpoint

    if pipe.dit.kernels.linear_precision != "bfloat16":
        raise ValueError(
            f"this pipeline's DiT holds {pipe.dit.kernels.linear_precision} weights; checkpoints keep "
            "the bfloat16 layout (quantise again when loading: KernelConfig(linear_precision='float8'))"
        )

    decoder = "vae" if isinstance(pipe.vae, WanVAE) else "taehv"
    configs = {
        "dit": pipe.dit.config.to_dict(),
        "t5": pipe.text_encoder.config.to_dict(),
        decoder: pipe.vae.config.to_dict(),
        "untrained": pipe.untrained,
    }
    if isinstance(pipe.tokenizer, ByteTokenizer):
        configs["tokenizer"] = "bytes"
    return save_checkpoint(
        out_dir, {"dit": pipe.dit_params, "t5": pipe.t5_params, decoder: pipe.vae_params}, configs, overwrite=overwrite
    )


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; expected one of {sorted(DECODERS)}")


__all__ = ["DECODERS", "TextToVideoPipeline", "VideoSpec", "pipeline_configs", "save_pipeline_checkpoint", "video_spec"]
