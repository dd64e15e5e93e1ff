"""Text to video, end to end: tokenizer -> umT5 -> causal DiT (Self-Forcing) -> Wan VAE (or the tiny
TAEHV decoder), streaming.

Each latent chunk is decoded as soon as it is denoised, with the decoder's causal caches carried
between chunks, so the first frames exist long before the video is done. Over a mesh the DiT runs
sequence-parallel and the Wan VAE decodes in bands of rows (`sharding/decode_bands.py`). With an
encoder (the Wan VAE encoder or TAEHV's), a request may also start from an image, continue a clip,
or restyle a video (`app/conditioning.py`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.app.conditioning import Conditioning, batched, extend_context, still_clip, video_frames
from causal_dit_jax.autoencoders.chunked_decode import LatentChunkDecoder
from causal_dit_jax.autoencoders.taehv import TAEHVConfig, TAEHVDecoder, get_taehv_preset
from causal_dit_jax.autoencoders.taehv_encoder import TAEHVEncoder
from causal_dit_jax.autoencoders.wan_vae import VAEConfig, WanVAE, get_vae_preset
from causal_dit_jax.autoencoders.wan_vae_encoder import WanVAEEncoder
from causal_dit_jax.checkpoint import read_checkpoint_config, restore_component
from causal_dit_jax.model.config import InferenceConfig, KernelConfig, ModelConfig, get_preset
from causal_dit_jax.model.dit import CausalWanDiT, Params, load_dit
from causal_dit_jax.model.kv_cache import TextKV
from causal_dit_jax.model.random_params import random_params
from causal_dit_jax.model.sampler import SelfForcingSampler, first_step_for_strength, initial_noise
from causal_dit_jax.text.tokenizer import ByteTokenizer, PromptTokenizer
from causal_dit_jax.text.umt5 import T5Config, UMT5Encoder, get_t5_preset

COMPONENTS = ("dit", "t5")
DECODERS = {"wan": "vae", "taehv": "taehv"}  # --decoder name -> checkpoint component
ENCODERS = {"wan": "vae_encoder", "taehv": "taehv_encoder"}  # --encoder name -> checkpoint component
DEFAULT_SIZE = (81, 480, 832)  # Self-Forcing's video: frames, height, width
DEMO_SIZE = (33, 128, 192)  # the random-weights demo's
# (chunk index, prompt) pairs, or a callable polled before each chunk: chunk index -> prompt or None.
# A prompt is one string for every video of the batch, or one string per video.
PromptSchedule = Sequence[tuple[int, str | Sequence[str]]] | Callable[[int], str | Sequence[str] | None]


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


@dataclasses.dataclass(frozen=True)
class RequestPlan:
    """A request checked and sized before any model work: its conditioning, the latent frames run as
    context (P) and generated (G), the latent grid, and the frames it yields."""

    conditioning: Conditioning
    context_latents: int
    generated_latents: int
    latent_height: int
    latent_width: int
    output_frames: int


def pipeline_configs(
    ckpt_dir: str | pathlib.Path | None, decoder: str = "wan", random_weights: bool = False
) -> tuple[ModelConfig, VAEConfig | TAEHVConfig]:
    """The DiT's and the chosen decoder's configs, read without loading any weights: a checkpoint's
    config.json, or with ckpt_dir None the embedded default's (random_weights: the random demo's)."""
    _check_decoder(decoder)
    if ckpt_dir is None and random_weights:
        return get_preset("demo"), get_vae_preset("tiny") if decoder == "wan" else get_taehv_preset("tiny")
    if ckpt_dir is None:
        from causal_dit_jax.embedded import read_embedded_config

        _check_embedded_decoders(decoder, None)
        meta = read_embedded_config()
        return ModelConfig.from_dict(meta["dit"]), VAEConfig.from_dict(meta["vae"])
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


def pipeline_default_size(ckpt_dir: str | pathlib.Path | None, random_weights: bool = False) -> tuple[int, int, int]:
    """(frames, height, width) of a model's default video: the embedded default's training size, the
    random demo's 33 x 128 x 192, or a checkpoint's (Self-Forcing's 81 x 480 x 832 unless its config
    names another)."""
    if ckpt_dir is None and random_weights:
        return DEMO_SIZE
    if ckpt_dir is None:
        from causal_dit_jax.embedded import default_size

        return default_size()
    size = read_checkpoint_config(ckpt_dir).get("default_size")
    return DEFAULT_SIZE if size is None else (int(size["frames"]), int(size["height"]), int(size["width"]))


def _check_embedded_decoders(decoder: str, encoder: str | None) -> None:
    for role, kind in (("decoder", decoder), ("encoder", encoder)):
        if kind not in (None, "wan"):
            raise ValueError(
                f"the embedded default has its own Wan VAE only ({role} {kind!r} asked): give a converted "
                f"checkpoint, or use the random-weights demo (TextToVideoPipeline.random_demo, --random-weights)"
            )


def plan_request(
    model: ModelConfig,
    decoder: VAEConfig | TAEHVConfig,
    inference: InferenceConfig,
    batch: int,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    *,
    image: np.ndarray | None = None,
    extend: np.ndarray | None = None,
    video: np.ndarray | None = None,
    strength: float = 0.5,
    context_chunks: int = 2,
    default_size: tuple[int, int, int] = (81, 480, 832),
) -> RequestPlan:
    """Check a request against the configs that own its sizes and size it, with no weights loaded
    (the CLI runs it before loading the models); the arguments as `TextToVideoPipeline.stream`'s.
    default_size: (frames, height, width) where they are not given (the model's default video)."""
    given = [name for name, x in (("image", image), ("extend", extend), ("video", video)) if x is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of image, extend and video, got {' and '.join(given)}")
    mode = given[0] if given else "text"
    c = inference.frames_per_chunk
    if mode != "text":
        what = "image" if mode == "image" else "video"
        media = batched({"image": image, "extend": extend, "video": video}[mode], 3 if mode == "image" else 4, batch, what)
        mh, mw = media.shape[-3:-1]
        if (height, width) not in ((None, None), (mh, mw)):
            raise ValueError(
                f"the {what} is {mh}x{mw}, but {height}x{width} was asked: resize it, or leave height and width "
                "out to use its size"
            )
        height, width = mh, mw
    height, width = (default_size[1] if height is None else height), (default_size[2] if width is None else width)

    def spec(n: int) -> VideoSpec:
        return video_spec(n, height, width, model, decoder, c)

    tf = decoder.temporal_factor
    context_latents = 0
    if mode in ("text", "image"):
        s = spec(default_size[0] if frames is None else frames)
        total, out = s.latent_frames, s.frames
        cond = Conditioning("text", None)
        if mode == "image":
            context_latents = c
            if total < 2 * c:
                raise ValueError(
                    f"an image-to-video request needs at least {decoder.num_frames(2 * c)} frames (the image's still "
                    f"chunk, then at least one generated chunk), got {s.frames}"
                )
            cond = Conditioning("image", still_clip(media, decoder.num_frames(c)))
    elif mode == "extend":
        new = 4 * tf * c if frames is None else frames
        if new <= 0 or new % (tf * c):
            raise ValueError(f"extend adds a positive multiple of {tf * c} frames (one chunk each), got {new}")
        spec(decoder.num_frames(c))  # the size rule
        context = extend_context(media, context_chunks, tf, c)
        context_latents = (context.shape[1] - 1) // tf + 1
        total, out = context_latents + new // tf, new
        cond = Conditioning("extend", context)
    else:
        clip = video_frames(media, frames, tf, c)
        s = spec(clip.shape[1])
        total, out = s.latent_frames, s.frames
        cond = Conditioning("video", clip, first_step_for_strength(strength, len(inference.denoising_steps)))
    f = decoder.spatial_factor
    return RequestPlan(cond, context_latents, total - context_latents, height // f, width // f, out)


def switch_prompts(prompt, batch: int, where: str) -> list[str]:
    """A switch's prompt as the batch's list: one non-empty string for every video, or one per video."""
    prompts = [prompt] * batch if isinstance(prompt, str) else prompt
    if not isinstance(prompts, Sequence) or len(prompts) != batch or not all(isinstance(x, str) and x.strip() for x in prompts):
        raise ValueError(f"{where}: a prompt must be a non-empty string (or {batch} of them, one per video), got {prompt!r}")
    return list(prompts)


def prompt_switches(
    schedule: Sequence[tuple[int, str | Sequence[str]]], chunks: int, batch: int, name: str = "prompt_schedule"
) -> dict[int, list[str]]:
    """A schedule of (chunk index, prompt) pairs checked before any model work: {chunk: the batch's
    prompts}. Indices are latent chunks of the generated video (`chunks` of them), increasing, from 1
    (chunk 0 takes the request's prompt). name: what the errors call the schedule."""
    if isinstance(schedule, str) or not isinstance(schedule, Sequence):
        raise ValueError(
            f"{name} must be (chunk index, prompt) pairs or a callable chunk index -> prompt or None, got {schedule!r}"
        )
    switches: dict[int, list[str]] = {}
    last = 0
    for entry in schedule:
        if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise ValueError(f"{name} entries are (chunk index, prompt) pairs, got {entry!r}")
        index, prompt = entry
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ValueError(f"{name}: a chunk index must be an int, got {index!r}")
        if not 1 <= index < chunks:
            where = f"chunks 1 .. {chunks - 1}" if chunks > 1 else "no chunk (make the video longer)"
            raise ValueError(
                f"{name}: chunk {index} is not a later chunk of this video: it has {chunks} latent "
                f"chunk{'s' if chunks != 1 else ''} and chunk 0 takes the prompt, so switches go at {where}"
            )
        if index <= last:
            raise ValueError(f"{name}: chunk indices must increase, got {index} after {last}")
        switches[int(index)] = switch_prompts(prompt, batch, f"{name} at chunk {index}")
        last = index
    return switches


class TextToVideoPipeline:
    """Holds the converted params (DiT, umT5, a video decoder), the tokenizer and optionally a mesh.

    vae: the video decoder, `WanVAE` (the full Wan2.1 VAE) or `TAEHVDecoder` (the tiny preview decoder);
    both stream with carried caches and give the same frame counts.

    mesh: a `sharding.make_mesh` mesh; the DiT then runs sequence-parallel over it (params replicated).
    banded_decode: with a mesh and the Wan VAE, decode each chunk in bands of rows over the mesh's
    sequence axes (`sharding.decode_bands.BandedWanVAE`; the VAE params replicated on the mesh once,
    copies over 'data'); the frames come to the host as before. False, the TAEHV decoder (too small to
    split) or a mesh of one sequence device decodes on one device; `self.banded_decode` says which runs.
    decode_devices: devices of their own for the decoder (e.g. the 8th GPU beside a 7-GPU mesh: a 7 + 1
    split), none of them the DiT's: each chunk's latents are copied there and decoded while the DiT
    goes on with the next chunk (the Wan VAE in bands of rows over them when there are several and
    banded_decode). None: the decoder runs on the DiT's devices.
    vae_latents_per_call: latent frames per VAE decode call. 1 (default) gives the first frame soonest
    and the smallest activation memory; 3 decodes a whole chunk per call (a little more throughput,
    a later first frame and more memory: figures in benchmarks/NOTES.md).
    encoder: frames -> latents (`WanVAEEncoder` or the approximate `TAEHVEncoder`), for requests that
    start from an image or a video; None: text-to-video only.
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
        encoder: WanVAEEncoder | TAEHVEncoder | None = None,
        encoder_params: Params | None = None,
        default_size: tuple[int, int, int] = DEFAULT_SIZE,
        banded_decode: bool = True,
        decode_devices: Sequence[jax.Device] | None = None,
    ):
        if not isinstance(banded_decode, bool):
            raise ValueError(f"banded_decode must be True or False, got {banded_decode!r}")
        decode_devices = _check_decode_devices(decode_devices, mesh)
        if text_encoder.config.dim != dit.config.text_dim:
            raise ValueError(f"text encoder width {text_encoder.config.dim} != DiT text_dim {dit.config.text_dim}")
        if (encoder is None) != (encoder_params is None):
            raise ValueError("give the encoder and its params together (or neither)")
        if encoder is not None and _latent_channels(encoder) != dit.config.in_dim:
            raise ValueError(
                f"the encoder makes {_latent_channels(encoder)}-channel latents, the DiT reads {dit.config.in_dim}"
            )
        self.dit, self.text_encoder, self.tokenizer, self.vae = dit, text_encoder, tokenizer, vae
        self.dit_params, self.t5_params, self.vae_params = dit_params, t5_params, vae_params
        self.encoder, self.encoder_params = encoder, encoder_params
        self.inference = inference
        self.untrained = untrained
        self.default_size = tuple(int(n) for n in default_size)  # frames, height, width when not asked
        self.vae_latents_per_call = vae_latents_per_call
        self.decode_devices = decode_devices
        if decode_devices is None:
            decode_mesh = mesh
        else:
            from causal_dit_jax.sharding.decode_bands import decoder_mesh

            decode_mesh = decoder_mesh(decode_devices)
        self.banded_decode = banded_decode and isinstance(vae, WanVAE) and _sequence_devices(decode_mesh) > 1
        self.frame_decoder = _banded_vae(vae, decode_mesh) if self.banded_decode else vae  # what decodes the chunks
        self._chunk_decoder = LatentChunkDecoder(self.frame_decoder, vae_latents_per_call)  # checks the count
        self.mesh = mesh
        self._decoder_device = None  # the one device of a decoder of its own (its caches are made there)
        if self.banded_decode:
            self.vae_params = self.frame_decoder.place(vae_params)  # once: replicated over the mesh
        elif decode_devices is not None:
            self._decoder_device = jax.sharding.SingleDeviceSharding(decode_devices[0])
            self.vae_params = jax.device_put(vae_params, self._decoder_device)
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
    def random_demo(
        cls,
        inference: InferenceConfig = InferenceConfig(),
        mesh=None,
        seed: int = 0,
        decoder: str = "wan",
        kernels: KernelConfig = KernelConfig(),
        encoder: str | None = None,
        banded_decode: bool = True,
        decode_devices: Sequence[jax.Device] | None = None,
    ) -> TextToVideoPipeline:
        """Small presets with deterministic random weights (untrained: the video is noise-like), for
        tests and demos of any shape (33 frames at 128x192 by default); every code path is the real
        model's.
        decoder: 'wan' (a narrow Wan VAE) or 'taehv' (a narrow TAEHV decoder); encoder: the same
        choice for the frames -> latents half (None: the decoder's kind); kernels: how the DiT's
        kernels run (`KernelConfig`; linear_precision='float8' runs its block GEMMs in e4m3);
        banded_decode: as the constructor's (with a mesh, the Wan VAE in bands of rows)."""
        config, decoder_config = pipeline_configs(None, decoder, random_weights=True)
        encoder = decoder if encoder is None else encoder
        _check_encoder(encoder)
        frame_encoder = WanVAEEncoder(get_vae_preset("tiny")) if encoder == "wan" else TAEHVEncoder(get_taehv_preset("tiny"))
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
            encoder=frame_encoder,
            encoder_params=random_params(frame_encoder.abstract_params(), seed + 3),
            default_size=DEMO_SIZE,
            banded_decode=banded_decode,
            decode_devices=decode_devices,
        )

    @classmethod
    def embedded_default(
        cls,
        inference: InferenceConfig = InferenceConfig(),
        mesh=None,
        decoder: str = "wan",
        kernels: KernelConfig = KernelConfig(),
        encoder: str | None = None,
        banded_decode: bool = True,
        decode_devices: Sequence[jax.Device] | None = None,
    ) -> TextToVideoPipeline:
        """The model shipped in the package (`causal_dit_jax/embedded.py`): a small DiT, umT5 and Wan VAE
        trained on the procedural world, 33 frames at 128x192 by default; prompts like
        'a red circle moving left on a white background'. Only its own VAE decodes and encodes."""
        return cls.from_embedded(None, inference, mesh, decoder, kernels, encoder, banded_decode, decode_devices)

    @classmethod
    def from_embedded(
        cls,
        folder: str | pathlib.Path | None,
        inference: InferenceConfig = InferenceConfig(),
        mesh=None,
        decoder: str = "wan",
        kernels: KernelConfig = KernelConfig(),
        encoder: str | None = None,
        banded_decode: bool = True,
        decode_devices: Sequence[jax.Device] | None = None,
    ) -> TextToVideoPipeline:
        """A model folder exported by `train/recipe.py` (None: the package's own). Unless `inference`
        names a window, the KV cache rolls over the window the model was trained under (config.json
        'rolling'), or for a model trained without one over the number of latent frames it learnt (9
        for 33 frames: the whole default video) with the stream's first chunk as the attention sink,
        so that a longer video's every chunk attends as in training: after the first chunk and its
        nearest predecessors. The sampler uses the flow-matching shift the model was trained with
        (config.json 'sampling')."""
        from causal_dit_jax.embedded import embedded_folder, read_embedded_config
        from causal_dit_jax.param_archive import load_params

        _check_decoder(decoder)
        _check_embedded_decoders(decoder, encoder)
        d = embedded_folder(folder)
        meta = read_embedded_config(d)
        size = meta["default_size"]
        if inference.local_attn_size == -1 and "rolling" in meta:  # the window it was trained under
            rolling = meta["rolling"]
            inference = inference.replace(local_attn_size=int(rolling["local_attn_size"]), sink_size=int(rolling["sink_size"]))
        elif inference.local_attn_size == -1:  # a rolling window of the clip length it learnt, its first chunk kept
            trained = 1 + (int(size["frames"]) - 1) // 4  # latent frames
            sink = inference.frames_per_chunk if trained > 2 * inference.frames_per_chunk else 0
            inference = inference.replace(local_attn_size=trained, sink_size=sink)
        if "sampling" in meta:  # the schedule belongs to the weights, as their shapes do
            inference = inference.replace(timestep_shift=float(meta["sampling"]["timestep_shift"]))
        dit_config = ModelConfig.from_dict(meta["dit"])
        vae_config = VAEConfig.from_dict(meta["vae"])
        t5 = UMT5Encoder(T5Config.from_dict(meta["t5"]))
        vae, frame_encoder = WanVAE(vae_config), WanVAEEncoder(vae_config)
        dit = CausalWanDiT(dit_config, kernels)
        dit_params = dit.quantize(
            jax.tree.map(jnp.asarray, load_params(d / "dit.npz", CausalWanDiT(dit_config).abstract_params()))
        )
        t5_params = jax.tree.map(jnp.asarray, load_params(d / "text.npz", t5.abstract_params()))
        halves = {"encoder": frame_encoder.abstract_params(), "decoder": vae.abstract_params()}
        vae_params = jax.tree.map(jnp.asarray, load_params(d / "vae.npz", halves))
        return cls(
            dit,
            dit_params,
            t5,
            t5_params,
            ByteTokenizer(max_length=int(meta["tokenizer"]["max_length"])),
            vae,
            vae_params["decoder"],
            inference,
            mesh,
            encoder=frame_encoder,
            encoder_params=vae_params["encoder"],
            default_size=(size["frames"], size["height"], size["width"]),
            banded_decode=banded_decode,
            decode_devices=decode_devices,
        )

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str | pathlib.Path,
        inference: InferenceConfig = InferenceConfig(),
        mesh=None,
        decoder: str = "wan",
        kernels: KernelConfig = KernelConfig(),
        encoder: str | None = None,
        banded_decode: bool = True,
        decode_devices: Sequence[jax.Device] | None = None,
    ) -> TextToVideoPipeline:
        """Load a folder written by `causal-dit convert` (DiT, umT5, VAE and the tokenizer).

        decoder: 'wan' decodes with the Wan2.1 VAE; 'taehv' with the tiny decoder (converted with
        `causal-dit convert ... --taehv taew2_1.pth`); only the chosen decoder is loaded.
        encoder: 'wan' or 'taehv', the encoder for image / video requests (None: the decoder's kind,
        loaded when the checkpoint has it; a checkpoint without it serves text-to-video only).
        kernels: how the DiT's kernels run (`KernelConfig`; linear_precision='float8' quantises its block
        linears to e4m3 after loading); banded_decode: as the constructor's."""
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
        frame_encoder = encoder_params = None
        kind = decoder if encoder is None else encoder
        _check_encoder(kind)
        if ENCODERS[kind] in meta.get("components", []):
            name = ENCODERS[kind]
            frame_encoder = (
                WanVAEEncoder(VAEConfig.from_dict(meta[name]))
                if kind == "wan"
                else TAEHVEncoder(TAEHVConfig.from_dict(meta[name]))
            )
            encoder_params = restore_component(d, name, frame_encoder.abstract_params())
        elif encoder is not None:
            raise ValueError(
                f"checkpoint {d} has no {encoder!r} encoder (it has {sorted(meta.get('components', []))}); "
                + _HOW_ENCODER[encoder]
            )
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
            encoder=frame_encoder,
            encoder_params=encoder_params,
            banded_decode=banded_decode,
            decode_devices=decode_devices,
        )

    # ------------------------------------------------------------------ pieces
    def video_spec(self, frames: int, height: int, width: int) -> VideoSpec:
        """`video_spec` against this pipeline's DiT, decoder and chunking."""
        return video_spec(frames, height, width, self.dit.config, self.vae.config, self.inference.frames_per_chunk)

    def text_context(self, prompts: str | Sequence[str]) -> jax.Array:
        """Tokenize and run umT5: the text-encoder states [B, K, text_dim] the DiT reads (what training
        data stores as 'text')."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompt given")
        tokens = self.tokenizer(prompts)
        return self._encode(self.t5_params, jnp.asarray(tokens.ids), jnp.asarray(tokens.mask))

    def negative_text_context(self, prompt: str = "") -> jax.Array:
        """The text-encoder states [1, K, text_dim] of a classifier-free guidance negative prompt; the
        empty one ("", which prompts refuse) is the end-of-sequence token alone, as in training."""
        if not isinstance(prompt, str):
            raise ValueError(f"a negative prompt is a str, got {type(prompt).__name__}")
        if prompt.strip():
            return self.text_context(prompt)
        from causal_dit_jax.train.text_conditioning import empty_caption

        ids, mask = empty_caption(self.tokenizer)
        return self._encode(self.t5_params, jnp.asarray(ids)[None], jnp.asarray(mask)[None])

    def encode_prompts(self, prompts: str | Sequence[str]) -> TextKV:
        """Tokenize, run umT5 once, and build the DiT's cross-attention K/V for the prompts."""
        return self._text_kv(self.dit_params, self._to_dit(self.text_context(prompts)))

    def _to_dit(self, x):
        """Place an input of the DiT where its params live (replicated over the mesh, if any)."""
        return x if self.mesh is None else jax.device_put(x, self.model.replicated())

    def plan(self, batch: int, *args, **kw) -> RequestPlan:
        """Check a request and size it, before any model work (the arguments as `stream`'s): the
        checks of `plan_request`, and that this pipeline has an encoder that fits them."""
        plan = plan_request(
            self.dit.config, self.vae.config, self.inference, batch, *args, default_size=self.default_size, **kw
        )
        frames = plan.conditioning.frames
        if frames is None:
            return plan
        if self.encoder is None:
            what = "an image" if plan.conditioning.mode == "image" else "a video"
            raise ValueError(
                f"this pipeline has no encoder, so it cannot take {what}: "
                "load a checkpoint converted with the VAE's encoder half (`causal-dit convert --wan-dir ...`)"
            )
        shape = frames.shape
        if isinstance(self.encoder, WanVAEEncoder):
            self.encoder.check_frames(shape, first_chunk=True)
        else:
            self.encoder.check_frames(jax.ShapeDtypeStruct(shape, jnp.float32))
        if _temporal_factor(self.encoder) != self.vae.config.temporal_factor:
            raise ValueError(
                f"the encoder makes a latent of {_temporal_factor(self.encoder)} frames, the decoder of "
                f"{self.vae.config.temporal_factor}"
            )
        return plan

    def encode_frames(self, frames: np.ndarray) -> jax.Array:
        """uint8 frames [B, 1 + 4k, H, W, 3] -> the DiT's latents [B, 1 + k, H/8, W/8, C] (float32), with
        this pipeline's encoder, placed where the DiT's inputs live."""
        x = jnp.asarray(frames, jnp.float32) / 127.5 - 1.0
        if isinstance(self.encoder, WanVAEEncoder):
            z = self.encoder.encode(self.encoder_params, x, latents_per_chunk=self.inference.frames_per_chunk)
        else:
            z = self.encoder.jit_encode(self.encoder_params, x)
        return self._to_dit(z)

    def _decoder_cache(self, batch: int, latent_height: int, latent_width: int):
        """A new video's decoder caches, where the decoder runs."""
        cache = self._chunk_decoder.init_cache(batch, latent_height, latent_width)
        return cache if self._decoder_device is None else jax.device_put(cache, self._decoder_device)

    def decode_latents(self, latents: jax.Array) -> np.ndarray:
        """The DiT's latents [B, 1 + k, H/8, W/8, C] -> uint8 frames [B, 1 + 4k, H, W, 3], with this
        pipeline's decoder streamed chunk by chunk as `stream` does (`encode_frames`'s inverse)."""
        b, f, h, w, _ = latents.shape
        c = self.inference.frames_per_chunk
        cache = self._decoder_cache(b, h, w)
        out = []
        for start in range(0, f, c):  # the decoder's causal caches carry over from chunk to chunk
            pixels, cache = self._chunk_decoder(self.vae_params, latents[:, start : start + c], cache)
            out.extend(np.asarray(x) for x in pixels)
        return np.concatenate(out, axis=1)

    def stream(
        self,
        prompts: str | Sequence[str],
        frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        stats: dict | None = None,
        *,
        image: np.ndarray | None = None,
        extend: np.ndarray | None = None,
        video: np.ndarray | None = None,
        strength: float = 0.5,
        context_chunks: int = 2,
        prompt_schedule: PromptSchedule | None = None,
        recache: bool = True,
        recache_chunks: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield uint8 frames [B, n, H, W, 3] as soon as each VAE call decodes them: with one latent per
        call, 1 frame, then 4 per latent frame (with 3, 9 then 12 per chunk).

        frames, height, width: the video's size (default the pipeline's `default_size`: 81 frames at 480x832
        for a converted Self-Forcing model, 33 at 128x192 for the embedded default; an image's or video's
        own size when one is given). At most one of:
        image: uint8 [H, W, 3] (or one per prompt, [B, H, W, 3]): image-to-video. The image held still
        for 9 frames is encoded (its first latent is the image's alone) and run at t=0 into the KV
        cache; the video's first 9 frames are that chunk decoded, the rest continue from it.
        extend: uint8 [T, H, W, 3] (or [B, T, H, W, 3]): continue the clip. Its last frames
        (`context_chunks` chunks of latents, 1 + 4 (3 m - 1) frames) are the context; `frames` new
        frames are yielded (a multiple of 12; default 48), the clip itself is not.
        video: uint8 [T, H, W, 3] (or [B, ...]): video-to-video. Its first `frames` frames (default:
        all that make whole chunks) are encoded, noised to the step `strength` selects (int(strength *
        steps) steps run; 1 ignores the video) and denoised chunk by chunk.

        prompt_schedule: switch the prompt at chunk boundaries, without restarting the stream. Either
        (chunk index, prompt) pairs, indices increasing from 1 (chunk 0 takes `prompts`), or a callable
        chunk index -> prompt or None (keep the current one), polled before each chunk from chunk 1 on,
        once the frames before it have been yielded: a live prompt. A prompt is a string for every
        video or one per video; one equal to the current is no switch. Chunk k is the k-th chunk of
        generated latents (3 latent frames: 12 video frames, from frame 12 k - 3 of a text-to-video).
        recache: at a switch, re-run the last clean chunks at t=0 with the new prompt into the KV cache
        (LongLive's KV re-cache; the attention sink kept), so that the next chunks follow the new prompt
        at once; False keeps the keys made under the old one. recache_chunks: how many (default: all
        that the cache attends; 0: a cut, the next chunk starts a new stream from the new prompt alone, sink included).

        stats, if given, receives 'first_frame_s' (prompt encoded -> first frames on the host) and
        'encode_s'; with a schedule, 'switches': the (chunk index, prompts) of each switch made.
        """
        batch = 1 if isinstance(prompts, str) else len(prompts)
        plan = self.plan(
            batch,
            frames,
            height,
            width,
            image=image,
            extend=extend,
            video=video,
            strength=strength,
            context_chunks=context_chunks,
        )
        cond, p, g = plan.conditioning, plan.context_latents, plan.generated_latents
        h, w = plan.latent_height, plan.latent_width
        text_for_chunk = self._text_schedule(prompts, batch, g, prompt_schedule, stats)
        if not isinstance(recache, bool):
            raise ValueError(f"recache must be True or False, got {recache!r}")
        if recache_chunks is not None and (text_for_chunk is None or not recache):
            raise ValueError("recache_chunks needs a prompt_schedule with recache=True (it sizes the re-cache at a switch)")
        if text_for_chunk is not None and recache:
            self.sampler.recache_limit(p + g, recache_chunks)  # checks it against the cache
        # Prompt-independent setup first (queued on the device while the prompt is encoded).
        rope = self.model.rope_tables(p + g, h, w)
        cache = self.sampler.init_cache(batch, p + g, h, w)
        t0 = time.perf_counter()
        text = self.encode_prompts(prompts)
        jax.block_until_ready(text)
        t1 = time.perf_counter()
        key = jax.random.key(seed)
        noise = self._to_dit(initial_noise(jax.random.fold_in(key, 0), batch, g, h, w, self.dit.config.in_dim))
        context = None
        if cond.mode in ("image", "extend"):
            context = self.encode_frames(cond.frames)
        elif cond.mode == "video":
            noise = self.sampler.noise_to_step(self.encode_frames(cond.frames), noise, cond.first_step)
        vae_cache = self._decoder_cache(batch, h, w)
        first = True

        def latent_chunks():
            if context is not None:
                yield context, cond.mode == "image"  # the image's still chunk is shown; a clip's context is not
            for latents in self.sampler.stream(
                self.dit_params,
                text,
                noise,
                jax.random.fold_in(key, 1),
                rope=rope,
                cache=cache,
                context=context,
                first_step=cond.first_step,
                text_for_chunk=text_for_chunk,
                recache=recache,
                recache_chunks=recache_chunks,
            ):
                yield latents, True

        # Without a live (callable) schedule the stream runs one chunk ahead: chunk i's decode is queued,
        # then chunk i + 1's DiT work, and only then are chunk i's frames pulled to the host, so the
        # device is not idle while the host takes them (the device runs them in the order queued, so the
        # first frames come no later). A callable is polled only after the frames before its chunk.
        ahead = not callable(prompt_schedule)
        chunks = latent_chunks()
        pending = next(chunks, None)
        while pending is not None:
            latents, shown = pending
            queued, vae_cache = self._chunk_decoder(self.vae_params, latents, vae_cache)
            pending = next(chunks, None) if ahead else None
            if not shown:  # decoded only to carry the decoder's caches into the new frames
                queued = []
            for pixels in queued:
                out = np.asarray(pixels)
                if stats is not None and first:
                    stats["encode_s"] = t1 - t0
                    stats["first_frame_s"] = time.perf_counter() - t1
                first = False
                yield out
            if not ahead:
                pending = next(chunks, None)

    def generate(self, prompts: str | Sequence[str], frames: int | None = None, *args, **kw) -> np.ndarray:
        """The whole video: uint8 [B, frames, H, W, 3] (with `extend`, the new frames); the arguments as
        `stream`'s (a prompt_schedule too)."""
        return np.concatenate(list(self.stream(prompts, frames, *args, **kw)), axis=1)

    def _text_schedule(
        self, prompts, batch: int, generated_latents: int, schedule: PromptSchedule | None, stats: dict | None
    ) -> Callable[[int], TextKV | None] | None:
        """The sampler's `text_for_chunk` for a prompt schedule (checked here, before any model work; a
        callable's answers when it is polled): each new prompt encoded when its chunk comes."""
        if schedule is None:
            return None
        if callable(schedule):
            poll = schedule
        else:
            switches = prompt_switches(schedule, generated_latents // self.inference.frames_per_chunk, batch)
            poll = switches.get
        current = [prompts] if isinstance(prompts, str) else list(prompts)

        def text_for_chunk(chunk: int) -> TextKV | None:
            prompt = poll(chunk)
            if prompt is None:
                return None
            new = switch_prompts(prompt, batch, f"prompt_schedule({chunk})")
            if new == current:
                return None
            current[:] = new
            if stats is not None:
                stats.setdefault("switches", []).append((chunk, list(new)))
            return self.encode_prompts(new)

        return text_for_chunk


def save_pipeline_checkpoint(pipe: TextToVideoPipeline, out_dir: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
    """Write all three models, the encoder if the pipeline has one, and a byte tokenizer marker or the
    tokenizer files, as one checkpoint."""
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
    components = {"dit": pipe.dit_params, "t5": pipe.t5_params, decoder: pipe.vae_params}
    if pipe.encoder is not None:  # the frames -> latents half, for image and video requests
        name = ENCODERS["wan" if isinstance(pipe.encoder, WanVAEEncoder) else "taehv"]
        components[name], configs[name] = pipe.encoder_params, pipe.encoder.config.to_dict()
    if isinstance(pipe.tokenizer, ByteTokenizer):
        configs["tokenizer"] = "bytes"
    return save_checkpoint(out_dir, components, configs, overwrite=overwrite)


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; expected one of {sorted(DECODERS)}")


def _check_encoder(encoder: str) -> None:
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {sorted(ENCODERS)}")


_HOW_ENCODER = {
    "wan": "convert with `causal-dit convert --wan-dir ...` from a Wan2.1_VAE.pth that has its encoder.* keys",
    "taehv": "convert with `causal-dit convert ... --taehv taew2_1.pth` (a file with its encoder.* half)",
}


def _sequence_devices(mesh) -> int:
    """Devices over the mesh's sequence axes (0 without a mesh)."""
    if mesh is None:
        return 0
    from causal_dit_jax.sharding.mesh import mesh_sizes

    _, ring, ulysses = mesh_sizes(mesh)
    return ring * ulysses


def _check_decode_devices(decode_devices, mesh) -> tuple | None:
    """decode_devices as a tuple of distinct devices, none of them the DiT's (the mesh's, or the
    default device without one); None stays None."""
    if decode_devices is None:
        return None
    devices = tuple(decode_devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError(f"decode_devices must be a non-empty sequence of jax devices, got {decode_devices!r}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"decode_devices names a device twice: {list(devices)}")
    dit_devices = set(mesh.devices.flat) if mesh is not None else {jax.devices()[0]}
    shared = [d for d in devices if d in dit_devices]
    if shared:
        raise ValueError(
            f"decode_devices must be devices of their own, but {shared} also run the DiT; "
            "without decode_devices the decoder runs on the DiT's devices"
        )
    return devices


def _banded_vae(vae: WanVAE, mesh):
    """The Wan VAE's decoder in bands of rows over the mesh's sequence axes ('ring', 'ulysses')."""
    from causal_dit_jax.sharding.decode_bands import BandedWanVAE

    return BandedWanVAE(vae, mesh)


def _latent_channels(encoder) -> int:
    return encoder.config.z_dim if isinstance(encoder, WanVAEEncoder) else encoder.config.latent_channels


def _temporal_factor(encoder) -> int:
    return encoder.config.temporal_factor if isinstance(encoder, WanVAEEncoder) else encoder.temporal_factor


__all__ = [
    "DECODERS",
    "ENCODERS",
    "PromptSchedule",
    "RequestPlan",
    "TextToVideoPipeline",
    "VideoSpec",
    "pipeline_configs",
    "plan_request",
    "prompt_switches",
    "save_pipeline_checkpoint",
    "switch_prompts",
    "video_spec",
]
