"""The `causal-dit` command line: generate, convert, bench."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence

from causal_dit_jax.model.config import (
    ATTENTION_IMPLS,
    LINEAR_PRECISIONS,
    NORM_ROPE_IMPLS,
    PRESETS,
    InferenceConfig,
    KernelConfig,
)
from causal_dit_jax.sharding.mesh import STRATEGIES


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert PyTorch checkpoints to an Orbax checkpoint folder")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="the DiT: Self-Forcing .pt, or Wan2.1 diffusion_pytorch_model.safetensors (file, index "
        "json or folder); default with --wan-dir: the Wan folder's own DiT",
    )
    p.add_argument(
        "--wan-dir",
        default=None,
        help="Wan2.1-T2V-1.3B folder: adds the umT5 encoder, the VAE and the tokenizer, so the "
        "checkpoint runs `causal-dit generate`",
    )
    p.add_argument(
        "--taehv",
        default=None,
        help="with --wan-dir: also convert the tiny preview decoder (taew2_1.pth or .safetensors), "
        "used by `generate --decoder taehv`",
    )
    p.add_argument("--out", required=True, help="output checkpoint folder (written atomically)")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="expected model shapes (default: inferred from the weights)"
    )
    p.add_argument("--which", default="generator_ema", help="entry of a Self-Forcing .pt (generator_ema)")
    _choice(
        p,
        "--dtype",
        ("bfloat16", "float32"),
        "bfloat16",
        "weight dtype of the DiT (and, with --wan-dir, the "
        "umT5 encoder; the VAE and TAEHV stay float32), also over a --preset's; the config says so",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _choice(p, flag: str, choices, default, help: str) -> None:
    p.add_argument(flag, default=default, choices=list(choices), help=help)


def _add_mesh(p) -> None:
    p.add_argument("--mesh", type=int, default=0, help="devices for sequence parallelism (0: one device)")
    _choice(p, "--strategy", STRATEGIES, None, "sequence-parallel attention, with --mesh (default hybrid)")


def _add_banded_decode(p) -> None:
    p.add_argument(
        "--no-banded-decode",
        action="store_true",
        help="with --mesh: decode every frame on one device (default: the Wan VAE decodes each chunk in bands of "
        "rows over the mesh's devices, the same frames within one uint8 level; the TAEHV decoder always runs on one "
        "device)",
    )
    p.add_argument(
        "--decode-devices",
        type=int,
        default=0,
        help="with --mesh N: the last K of the N devices decode, on their own (a 7 + 1 split: --mesh 8 "
        "--decode-devices 1), while the DiT runs over the other N - K (default 0: the decoder on the DiT's devices)",
    )


def _add_bench(sub) -> None:
    from causal_dit_jax.bench.compare import FIGURES

    p = sub.add_parser("bench", help="time the DiT rollout with random weights")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument(
        "--frames",
        type=int,
        default=33,
        help="video frames, as generate's: 1 + 4k with k+1 a multiple of 3 (33 = 9 latent frames, the default; 81 = 21)",
    )
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    _add_mesh(p)
    _add_banded_decode(p)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="profile one forward (GPU): matmul/attention/other")
    p.add_argument(
        "--e2e",
        action="store_true",
        help="also run the product loop: each chunk decoded as it is made, by the Wan VAE (bf16) "
        "and by the tiny TAEHV decoder (bf16)",
    )
    p.add_argument("--vae-preset", default="wan2.1", help="VAE size for --e2e (wan2.1 or tiny)")
    p.add_argument("--vae-latents-per-call", type=int, default=1, help="latent frames per VAE decode call (--e2e)")
    p.add_argument(
        "--compilation-cache",
        default=None,
        help="JAX persistent compilation cache folder (run twice: the second run's compile is warm)",
    )
    p.add_argument("--scan-unroll", type=int, default=1, help="layers per iteration of the layer loop")
    p.add_argument(
        "--per-layer-weights",
        action="store_true",
        help="one weight buffer per layer (a Python layer loop: no weight copies, slower compiles)",
    )
    _choice(p, "--norm-rope", NORM_ROPE_IMPLS, "xla", "q/k RMSNorm + RoPE: XLA fusions or one Pallas kernel")
    _choice(p, "--attention", ATTENTION_IMPLS, None, "self-attention kernel (default: the backend's choice)")
    _choice(
        p,
        "--residual-dtype",
        ("float32", "bfloat16"),
        None,
        "the residual stream's dtype over the preset's (bfloat16 = Self-Forcing's all-bf16 cast)",
    )
    _choice(
        p,
        "--linear-precision",
        LINEAR_PRECISIONS,
        "bfloat16",
        "float8: the block GEMMs in e4m3 (per-channel / per-token scales; changes the output)",
    )
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="FILE.json",
        help="a peer's measured figures to print ours against, with the speed-up (>1: ours faster), "
        "also written under 'comparison' in --json (repeatable; e.g. benchmarks/peers/*.json). "
        'The file: {"name": ..., "figures": {NAME: value}, optional "source", "setting", '
        f'"notes"}}; figure names: {", ".join(FIGURES)} (see causal_dit_jax/bench/compare.py)',
    )


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text to video: write an mp4 while the stream runs")
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="the prompt (repeat for a batch: one video per prompt, OUT_0.mp4, OUT_1.mp4, ...)",
    )
    p.add_argument("--out", required=True, help="output .mp4 path")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and OUT_0.mp4, ... of a batch) if it exists")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="folder from `causal-dit convert` (default: the embedded default, trained on the procedural world)",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="without --checkpoint: the untrained random-weights demo instead of the embedded default (any decoder)",
    )
    p.add_argument(
        "--frames",
        type=int,
        default=None,
        help="video frames, 1 + 4k with k+1 a multiple of 3 (default: the model's; 81, or 33 for the embedded default)",
    )
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default: the model's; 480, embedded 128)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default: the model's; 832, embedded 192)")
    p.add_argument("--seed", type=int, default=0)
    _add_mesh(p)
    _add_banded_decode(p)
    p.add_argument(
        "--local-attn-size",
        type=int,
        default=-1,
        help="rolling KV cache window in latent frames (4 video frames each; any count, as Self-Forcing: "
        "it must exceed --sink-size by at least 3 frames, one chunk); -1: the whole video",
    )
    p.add_argument(
        "--sink-size",
        type=int,
        default=0,
        help="attention-sink latent frames (4 video frames each), the stream's first, never evicted from "
        "the window; needs --local-attn-size with local-attn-size - sink-size >= 3",
    )
    _choice(
        p,
        "--linear-precision",
        LINEAR_PRECISIONS,
        "bfloat16",
        "float8: the DiT's block GEMMs in e4m3, faster GEMMs on Hopper; the video is close to, not equal to, the bfloat16 one",
    )
    _choice(
        p,
        "--decoder",
        ("wan", "taehv"),
        "wan",
        "wan: the Wan2.1 VAE; taehv: the tiny preview decoder (checkpoint converted with --taehv)",
    )
    switch = p.add_argument_group("switching the prompt mid-stream (the stream goes on; LongLive's KV re-cache)")
    switch.add_argument(
        "--switch",
        action="append",
        metavar="CHUNK:PROMPT",
        default=None,
        help="from latent chunk CHUNK on (12 video frames each; chunk k starts at frame 12k - 3), follow PROMPT "
        "(every video of a batch); repeat with increasing chunks, e.g. --switch 4:'a blue square moving right'",
    )
    switch.add_argument(
        "--no-recache",
        action="store_true",
        help="at a switch, keep the KV cache made under the old prompt (default: re-run the last chunks into it "
        "with the new one)",
    )
    switch.add_argument(
        "--recache-chunks",
        type=int,
        default=None,
        help="chunks re-run into the KV cache at a switch (default: all the cache attends; 0: a cut, the video "
        "starts over from the new prompt)",
    )
    start = p.add_argument_group(
        "starting from an image or a video (at most one; the video takes its size, so leave --height/--width out)"
    )
    start.add_argument(
        "--image",
        metavar="PNG",
        default=None,
        help="image-to-video: the image (held still for 9 frames) is encoded and run at t=0 into the KV cache; "
        "the video's first frames are it, the rest continue from it",
    )
    start.add_argument(
        "--extend",
        metavar="MP4",
        default=None,
        help="continue this clip: its last frames are the context; --out gets the clip followed by --frames new "
        "frames (a multiple of 12; default 48)",
    )
    start.add_argument(
        "--context-chunks",
        type=int,
        default=2,
        help="with --extend: chunks of latents taken from the clip's end as context (1 + 4 (3m - 1) frames; default 2)",
    )
    start.add_argument(
        "--video",
        metavar="MP4",
        default=None,
        help="video-to-video: the clip (its first --frames frames, default all that make whole chunks) is "
        "encoded, noised to the step --strength selects and denoised chunk by chunk",
    )
    start.add_argument(
        "--strength",
        type=float,
        default=None,
        help="with --video: how far the video may change, (0, 1]: int(strength * 4) of the 4 steps run "
        "(1: the video is ignored; default 0.5)",
    )
    _choice(
        start,
        "--encoder",
        ("wan", "taehv"),
        None,
        "frames -> latents: wan: the Wan2.1 VAE encoder; taehv: TAEHV's fast, approximate encoder (default: "
        "the --decoder's kind)",
    )


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train the causal DiT from a run config (teacher or diffusion forcing on precomputed latents; ODE "
        "regression or DMD from a teacher on prompts)",
        description="Train (or resume) the run a JSON config describes (causal_dit_jax.train.run.RunConfig): "
        "checkpoints, metrics.jsonl, loss.png and the exported EMA weights go to its out_dir.",
    )
    p.add_argument("--config", required=True, metavar="RUN.json", help="the run config (RunConfig fields as JSON)")
    p.add_argument(
        "--stop-after", type=int, default=None, metavar="N", help="stop after N steps with a checkpoint (resume later)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_prepare_data(sub) -> None:
    p = sub.add_parser(
        "prepare-data",
        help="training data: captioned videos (name.mp4 + name.txt) -> latents and text states (.npz), or a prompt "
        "file -> text states (the data of ode_regression / dmd runs)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--videos", help="folder of .mp4 clips, each with a same-stem .txt caption")
    source.add_argument("--prompts", help="a text file of prompts, one a line (a distillation run's data)")
    p.add_argument("--out", required=True, help="the folder to write (train's 'data')")
    p.add_argument(
        "--negative-prompt", default="", help="the teacher's classifier-free guidance's negative prompt (default: empty)"
    )
    p.add_argument(
        "--checkpoint", default=None, help="folder from `causal-dit convert` (default: the embedded default's umT5 and VAE)"
    )
    p.add_argument("--frames", type=int, default=None, help="frames per clip, 1 + 4k (default 81; 21 for the demo)")
    _choice(p, "--encoder", ("wan", "taehv"), None, "the frames -> latents encoder (default wan)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def cmd_prepare_data(args) -> int:
    from causal_dit_jax.app.pipeline import TextToVideoPipeline
    from causal_dit_jax.app.prepare_data import prepare_latents, prepare_prompts
    from causal_dit_jax.checkpoint import check_output_dir

    check_output_dir(args.out, args.overwrite)  # before any model is built
    if args.prompts is not None:
        from causal_dit_jax.train.data import PromptListSource

        PromptListSource(args.prompts)  # the file's errors before any model is built
    if args.checkpoint is None:
        pipe = TextToVideoPipeline.embedded_default(encoder=args.encoder)
    else:
        pipe = TextToVideoPipeline.from_checkpoint(args.checkpoint, encoder=args.encoder)
    if args.prompts is not None:
        out = prepare_prompts(pipe, args.prompts, args.out, overwrite=args.overwrite, negative_prompt=args.negative_prompt)
        print(f"wrote {out} ({len(list(out.glob('*.npz')))} prompts)")
        return 0
    frames = args.frames if args.frames is not None else (21 if args.checkpoint is None else 81)
    out = prepare_latents(pipe, args.videos, args.out, frames, overwrite=args.overwrite, negative_prompt=args.negative_prompt)
    print(f"wrote {out} ({len(list(out.glob('*.npz')))} clips)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="causal-dit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_bench(sub)
    _add_generate(sub)
    _add_train(sub)
    _add_prepare_data(sub)
    _add_serve(sub)
    return parser


def cmd_train(args) -> int:
    from causal_dit_jax.train.run import RunConfig, train

    config = RunConfig.from_file(args.config)
    on_checkpoint = None
    if config.sample_prompts:
        from causal_dit_jax.app.samples import SampleWriter

        on_checkpoint = SampleWriter.for_run(config)  # checks the pipeline against the run before training
    train(config, progress=not args.quiet, stop_after=args.stop_after, on_checkpoint=on_checkpoint)
    return 0


def cmd_convert(args) -> int:
    from causal_dit_jax.convert import convert_dit_checkpoint, convert_pipeline_checkpoint
    from causal_dit_jax.model.config import get_preset

    config = get_preset(args.preset) if args.preset else None
    if args.wan_dir:
        out = convert_pipeline_checkpoint(
            args.wan_dir,
            args.out,
            args.checkpoint,
            config,
            args.which,
            overwrite=args.overwrite,
            taehv_checkpoint=args.taehv,
            dtype=args.dtype,
        )
    elif args.taehv:
        raise ValueError("--taehv needs --wan-dir (the tiny decoder is part of a generation checkpoint)")
    elif args.checkpoint:
        out = convert_dit_checkpoint(args.checkpoint, args.out, config, args.which, args.overwrite, dtype=args.dtype)
    else:
        raise ValueError("give --checkpoint (the DiT alone) and/or --wan-dir (DiT, text encoder, VAE, tokenizer)")
    print(f"wrote {out}")
    return 0


def _strategy(args) -> str | None:
    """--mesh / --strategy checked together: the strategy (default hybrid) with a mesh, None without."""
    if args.mesh < 0:
        raise ValueError(f"--mesh must be a device count (0: one device, no mesh), got {args.mesh}")
    if not args.mesh:
        if args.strategy is not None:
            raise ValueError(f"--strategy {args.strategy} needs --mesh N (the devices to run it on)")
        return None
    return args.strategy or "hybrid"


def _banded_decode(args, strategy: str | None) -> bool:
    """--no-banded-decode checked against --mesh: whether a mesh pipeline may decode in bands of rows."""
    if args.no_banded_decode and strategy is None:
        raise ValueError("--no-banded-decode sets how a --mesh decodes: give --mesh N (without it, one device decodes)")
    return not args.no_banded_decode


def _decode_devices(args, strategy: str | None) -> int:
    """--decode-devices checked against --mesh: how many of the mesh's devices decode on their own."""
    k = args.decode_devices
    if k < 0:
        raise ValueError(f"--decode-devices must be >= 0, got {k}")
    if k and strategy is None:
        raise ValueError("--decode-devices splits a --mesh's devices: give --mesh N (N > K)")
    if k and k >= args.mesh:
        raise ValueError(f"--decode-devices {k} leaves none of the --mesh {args.mesh} devices to the DiT")
    return k


def _meshes(args, strategy: str | None, num_heads: int, decode_devices: int):
    """(the DiT's mesh or None, the decoder's own devices or None) for --mesh N --decode-devices K: the
    DiT over the first N - K devices, the decoder on the last K."""
    if strategy is None:
        return None, None
    import jax

    from causal_dit_jax.sharding import make_mesh

    devices = jax.devices()
    if args.mesh > len(devices):
        make_mesh(args.mesh, strategy=strategy, num_heads=num_heads)  # its error names the visible devices
    dit = args.mesh - decode_devices
    mesh = make_mesh(devices=devices[:dit], strategy=strategy, num_heads=num_heads)
    return mesh, _own_decode_devices(args.mesh, decode_devices)


def _own_decode_devices(mesh: int, decode_devices: int) -> tuple | None:
    """The last `decode_devices` of the first `mesh` devices (None for 0)."""
    import jax

    return tuple(jax.devices()[mesh - decode_devices : mesh]) if decode_devices else None


def _decode_note(pipe, banded_decode: bool) -> str:
    """Where a pipeline with a mesh decodes, for the log."""
    from causal_dit_jax.autoencoders.wan_vae import WanVAE

    if pipe.decode_devices:
        k, n = len(pipe.decode_devices), pipe.mesh.devices.size
        how = f"the Wan VAE in bands of rows over {k} devices" if pipe.banded_decode else "on one device"
        return f"decoding: {how} of its own (--decode-devices {k}); the DiT over the other {n}"
    if pipe.banded_decode:
        n = pipe.frame_decoder.devices
        return f"decoding: the Wan VAE in bands of rows over {n} devices (--no-banded-decode: on one device)"
    if not banded_decode:
        return "decoding: on one device (--no-banded-decode)"
    why = "the TAEHV decoder is not split" if not isinstance(pipe.vae, WanVAE) else "one sequence device"
    return f"decoding: on one device ({why})"


def cmd_bench(args) -> int:
    from causal_dit_jax import bench
    from causal_dit_jax.app.pipeline import video_spec
    from causal_dit_jax.autoencoders.wan_vae import get_vae_preset
    from causal_dit_jax.model.config import get_preset

    mesh_strategy = _strategy(args)
    decode_devices = _decode_devices(args, mesh_strategy)
    config = get_preset(args.preset)
    # --frames counts video frames, as in generate; the rollout runs their latent frames
    latent_frames = video_spec(
        args.frames, args.height, args.width, config, get_vae_preset("wan2.1"), InferenceConfig().frames_per_chunk
    ).latent_frames
    peers = [bench.load_peer(path) for path in args.compare]  # a bad file fails before any bench work
    for peer in peers:
        peer.check_setting(preset=args.preset, latent_frames=latent_frames, height=args.height, width=args.width)
    if args.compilation_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    if args.residual_dtype:
        config = config.replace(residual_dtype=args.residual_dtype)
    from causal_dit_jax.model.dit import CausalWanDiT

    kernels = KernelConfig(
        attention_impl=args.attention,
        norm_rope_impl=args.norm_rope,
        linear_precision=args.linear_precision,
        scan_unroll=args.scan_unroll,
    )
    dit, strategy, comm = CausalWanDiT(config, kernels), "single", None
    if args.mesh:
        if args.per_layer_weights:
            print("error: --per-layer-weights runs on one device (drop --mesh)", file=sys.stderr)
            return 2
        from causal_dit_jax.sharding.sequence_parallel import sequence_parallel_dit

        down = get_vae_preset("wan2.1").spatial_factor  # run_dit_bench's latents
        dit, comm = sequence_parallel_dit(
            dit,
            args.mesh - decode_devices,
            mesh_strategy,
            InferenceConfig(),
            num_frames=latent_frames,
            latent_height=args.height // down,
            latent_width=args.width // down,
        )
        strategy = mesh_strategy
    result = bench.run_dit_bench(
        config,
        latent_frames,
        args.height,
        args.width,
        InferenceConfig(),
        dit=dit,
        strategy=strategy,
        comm_bytes_per_chunk=comm,
        repeats=args.repeats,
        profile=args.profile,
        e2e_vae=args.vae_preset if args.e2e else None,
        vae_latents_per_call=args.vae_latents_per_call,
        per_layer_weights=args.per_layer_weights,
        banded_decode=bool(args.mesh) and not args.no_banded_decode,
        decode_devices=_own_decode_devices(args.mesh, decode_devices),
    )
    print(result.table())
    ours = bench.measured_figures(result)
    comparison = [bench.compare(ours, peer) for peer in peers]
    for c in comparison:
        print()
        print(bench.comparison_table(c))
    if args.json:
        bench.write_json(args.json, **result.as_dict(), **({"comparison": comparison} if peers else {}))
    return 0


def _out_paths(out: str, count: int) -> list:
    import pathlib

    p = pathlib.Path(out)
    if count == 1:
        return [p]
    return [p.with_name(f"{p.stem}_{i}{p.suffix}") for i in range(count)]


def cmd_generate(args) -> int:
    import contextlib
    import time

    from tqdm import tqdm

    from causal_dit_jax.app.pipeline import pipeline_configs, pipeline_default_size, plan_request, prompt_switches
    from causal_dit_jax.app.video import Mp4Writer, check_writable

    # Everything a user typed is checked before any model work (config.json at most is read).
    for name in ("frames", "height", "width"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be positive, got {value} (leave it out for the model's default)")
    strategy = _strategy(args)
    banded_decode = _banded_decode(args, strategy)
    decode_devices = _decode_devices(args, strategy)
    if any(not p.strip() for p in args.prompt):
        raise ValueError("the prompt is empty")
    outs = _out_paths(args.out, len(args.prompt))
    for o in outs:
        check_writable(o, overwrite=args.overwrite)
    if args.random_weights and args.checkpoint is not None:
        raise ValueError("--random-weights is the demo without a checkpoint; leave out one of it and --checkpoint")
    random_weights = args.random_weights
    media, clip = _read_start(args)
    frames, height, width = args.frames, args.height, args.width
    default = pipeline_default_size(args.checkpoint, random_weights)
    if media is None or args.image:  # text or image: the model's default length
        frames = frames if frames is not None else default[0]
    if media is None:
        height = height if height is not None else default[1]
        width = width if width is not None else default[2]
    inference = InferenceConfig(local_attn_size=args.local_attn_size, sink_size=args.sink_size)
    kernels = KernelConfig(linear_precision=args.linear_precision)
    model_config, decoder_config = pipeline_configs(args.checkpoint, args.decoder, random_weights)  # configs only
    plan = plan_request(
        model_config, decoder_config, inference, len(args.prompt), frames, height, width, default_size=default, **media or {}
    )
    height, width = plan.latent_height * decoder_config.spatial_factor, plan.latent_width * decoder_config.spatial_factor
    switches = []  # --switch CHUNK:PROMPT, checked against the video's chunks
    for value in args.switch or []:
        index, colon, prompt = value.partition(":")
        if not colon or not index.strip().isdigit():
            raise ValueError(f"--switch takes CHUNK:PROMPT (e.g. --switch 4:'a blue square moving right'), got {value!r}")
        switches.append((int(index), prompt.strip()))
    if not switches and (args.no_recache or args.recache_chunks is not None):
        raise ValueError("--no-recache and --recache-chunks set how a --switch re-caches: give a --switch")
    if args.no_recache and args.recache_chunks is not None:
        raise ValueError("--recache-chunks sizes the re-cache that --no-recache turns off: give one of them")
    prompt_switches(switches, plan.generated_latents // inference.frames_per_chunk, len(args.prompt), "--switch")
    mesh, decode_on = _meshes(args, strategy, model_config.num_heads, decode_devices)
    t_load = time.perf_counter()
    pipe = _load_pipeline(
        args.checkpoint, random_weights, inference, mesh, args.decoder, kernels, args.encoder, banded_decode, decode_on
    )
    if media:
        pipe.plan(len(args.prompt), frames, height, width, **media)  # and that its encoder can take them
    recache = not args.no_recache
    if switches and recache:  # against the pipeline's own window (the embedded default's rolls)
        pipe.sampler.recache_limit(plan.context_latents + plan.generated_latents, args.recache_chunks)
    c = inference.frames_per_chunk
    latents = plan.context_latents + plan.generated_latents
    split = f": {plan.context_latents // c} of context, {plan.generated_latents // c} generated" if plan.context_latents else ""
    start = {"text": "", "image": " from the image", "extend": " after the clip", "video": " from the video"}
    print(
        f"models ready in {time.perf_counter() - t_load:.1f} s; {plan.output_frames} frames at {height}x{width}"
        f"{start[plan.conditioning.mode]} ({latents} latent frames, {_plural(latents // c, 'chunk')}{split}); the "
        "first chunk includes compilation",
        flush=True,
    )
    if mesh is not None:
        print(_decode_note(pipe, banded_decode), flush=True)
    if switches:
        n = "all attended" if args.recache_chunks is None else args.recache_chunks
        how = "no re-cache" if not recache else "a cut" if n == 0 else f"re-cache of {n} chunks"
        print(f"prompt switches ({how}): " + "; ".join(f"chunk {i}: {q!r}" for i, q in switches), flush=True)
    stats: dict = {}
    written = 0
    with contextlib.ExitStack() as stack:  # on any exception (a signal too) the partial mp4s are deleted
        writers = [stack.enter_context(Mp4Writer(o)) for o in outs]
        if clip is not None:  # the extended clip first, as it is
            for w in writers:
                w.write(clip)
        t0 = time.perf_counter()
        bar = None
        switching = {"prompt_schedule": switches, "recache": recache, "recache_chunks": args.recache_chunks} if switches else {}
        for chunk in pipe.stream(args.prompt, frames, height, width, args.seed, stats=stats, **switching, **media or {}):
            for w, video in zip(writers, chunk):
                w.write(video)
            written += chunk.shape[1]
            if bar is None:  # the bar's clock starts with the first frames: its estimate leaves out compilation
                bar = stack.enter_context(tqdm(total=plan.output_frames, initial=written, unit="frame", desc="generating"))
            else:
                bar.update(chunk.shape[1])
        if bar is not None:
            bar.close()
        total = time.perf_counter() - t0
    before = 0 if clip is None else len(clip)
    for o in outs:
        print(f"wrote {o} ({before + written} frames, 16 fps{f'; {before} from the clip' if before else ''})")
    print(
        f"first frames after {stats.get('first_frame_s', float('nan')):.2f} s (prompt encoded in "
        f"{stats.get('encode_s', float('nan')):.2f} s); {written / total:.2f} frames per second "
        f"end to end ({total:.1f} s, including compilation)"
    )
    return 0


def _read_start(args) -> tuple[dict | None, object]:
    """--image / --extend / --video read and paired with their options, before any model work: the
    keywords for `TextToVideoPipeline.stream` (None: text only) and the clip to extend (else None)."""
    from causal_dit_jax.app.conditioning import read_image, read_video

    given = [f"--{n}" for n in ("image", "extend", "video") if getattr(args, n)]
    if len(given) > 1:
        raise ValueError(f"give at most one of --image, --extend and --video, got {' and '.join(given)}")
    if args.strength is not None and not args.video:
        raise ValueError("--strength needs --video (the clip to restyle)")
    if args.context_chunks != 2 and not args.extend:
        raise ValueError("--context-chunks needs --extend (the clip to continue)")
    if args.encoder is not None and not given:
        raise ValueError("--encoder needs --image, --extend or --video (text-to-video encodes no frames)")
    if (args.height is not None or args.width is not None) and given:
        raise ValueError(f"{given[0]} sets the video's size: leave --height and --width out")
    if args.image:
        return {"image": read_image(args.image)}, None
    if args.extend:
        clip = read_video(args.extend)
        return {"extend": clip, "context_chunks": args.context_chunks}, clip
    if args.video:
        return {"video": read_video(args.video), "strength": 0.5 if args.strength is None else args.strength}, None
    return None, None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _load_pipeline(
    checkpoint,
    random_weights: bool,
    inference,
    mesh,
    decoder: str,
    kernels,
    encoder=None,
    banded_decode: bool = True,
    decode_devices=None,
):
    """The pipeline generate and serve run: a checkpoint's, else the embedded default (random_weights:
    the untrained demo), each announced; banded_decode: with a mesh, the Wan VAE in bands of rows;
    decode_devices: the decoder's own devices (None: the DiT's)."""
    from causal_dit_jax.app.pipeline import TextToVideoPipeline

    kw = {"mesh": mesh, "decoder": decoder, "kernels": kernels, "encoder": encoder, "banded_decode": banded_decode}
    kw["decode_devices"] = decode_devices

    if checkpoint is None and random_weights:
        print(
            "--random-weights: the demo model's weights are random and UNTRAINED: the video shows the "
            "pipeline working, not a picture of the prompt.",
            flush=True,
        )
        return TextToVideoPipeline.random_demo(inference, **kw)
    if checkpoint is None:
        print(
            "No --checkpoint: the embedded default, a small model trained on procedural clips. It knows "
            "'a {colour} {shape} moving {direction} [on a {background} background]' (README: its words).",
            flush=True,
        )
        return TextToVideoPipeline.embedded_default(inference, **kw)
    return TextToVideoPipeline.from_checkpoint(checkpoint, inference, **kw)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="live text to video in the browser: a page and one WebSocket per session",
        description="Serve a page that streams videos as they are generated (frames as JPEGs over a WebSocket), "
        "switches prompts while playing, and offers the finished mp4. Each session's first-frame latency and "
        "generation fps go to the log.",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="folder from `causal-dit convert` (default: the embedded default, trained on the procedural world)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    _add_mesh(p)
    _add_banded_decode(p)
    _choice(
        p,
        "--decoder",
        ("wan", "taehv"),
        "wan",
        "the page's default decoder; the other is offered too if the checkpoint has it (loaded on first use)",
    )
    p.add_argument("--max-sessions", type=int, default=4, help="pages served at once; one more is told the server is busy")
    p.add_argument(
        "--max-frames", type=int, default=481, help="the longest video a page may ask for (each generation holds its KV cache)"
    )
    _choice(
        p,
        "--switch-mode",
        ("recache", "cut", "keep"),
        "recache",
        "the page's default for a prompt switch: recache re-runs the recent chunks with the new prompt (LongLive); "
        "cut starts the next chunk from the new prompt alone (what the embedded default follows); keep leaves the cache",
    )


def cmd_serve(args) -> int:
    from causal_dit_jax.app.pipeline import DECODERS, pipeline_configs
    from causal_dit_jax.app.serve import ServerConfig, serve

    strategy = _strategy(args)
    banded_decode = _banded_decode(args, strategy)
    decode_devices = _decode_devices(args, strategy)
    model_config, _ = pipeline_configs(args.checkpoint, args.decoder)  # it has the decoder, before any model work
    decoders = [args.decoder]
    for other in DECODERS:
        if other != args.decoder:
            with contextlib.suppress(ValueError):
                pipeline_configs(args.checkpoint, other)
                decoders.append(other)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_sessions=args.max_sessions,
        max_frames=args.max_frames,
        decoders=tuple(decoders),
        switch=args.switch_mode,
    )
    mesh, decode_on = _meshes(args, strategy, model_config.num_heads, decode_devices)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"listening on {args.host}: anyone who can reach it may use this server (it has no login)", flush=True)

    def pipeline(decoder: str):
        return _load_pipeline(
            args.checkpoint,
            False,
            InferenceConfig(),
            mesh,
            decoder,
            KernelConfig(),
            banded_decode=banded_decode,
            decode_devices=decode_on,
        )

    serve(pipeline, config)
    return 0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command, raised in the main thread so that every `with` block cleans up
    (partial mp4s, a half-written checkpoint folder); `main` turns it into one line and 128 + signum."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` (SIGTERM's default would end the process with no cleanup).
    Only the first raises: signals that arrive while the command unwinds do not cut its cleanup short."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    raised = []

    def handler(signum, frame):
        if not raised:
            raised.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


_NOT_WRITTEN = {
    "generate": "; no video written",
    "convert": "; no checkpoint written",
    "train": "; the run resumes from its last checkpoint",
    "prepare-data": "; no data folder written",
}


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)
    command = {
        "convert": cmd_convert,
        "bench": cmd_bench,
        "generate": cmd_generate,
        "train": cmd_train,
        "prepare-data": cmd_prepare_data,
        "serve": cmd_serve,
    }[args.command]
    try:
        with _signals_interrupt():
            return command(args)
    except KeyboardInterrupt as e:  # Interrupted, or a Ctrl-C outside the handler's reach
        signum = getattr(e, "signum", signal.SIGINT)
        print(
            f"causal-dit {args.command}: interrupted ({signal.Signals(signum).name}){_NOT_WRITTEN.get(args.command, '')}",
            file=sys.stderr,
        )
        return 128 + signum
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"causal-dit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
