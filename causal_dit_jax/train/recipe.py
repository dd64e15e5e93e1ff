"""The embedded default's recipe: a VAE, a text encoder and a causal DiT trained from scratch on the
procedural world (`train/procedural.py`), then distilled to the 4-step sampler.

Stages, each resumable from its own Orbax checkpoints and finished by a result file in the run folder:
  vae      the Wan-architecture VAE as an autoencoder on short clips (`train/autoencoder.py`), then its
           latent statistics measured on full clips -> vae.npz, vae_config.json
  decoder  the decoder alone on full-length clips, the encoder frozen (`DecoderObjective`): a causal
           decoder trained on 9 frames never reaches its caches' steady state, and drifts after them;
           the latents do not change, so the DiT's stages need not wait for it -> vae.npz, decoder.json
  decoder_long  another decoder round on decoder_long_frames clips, several times the default video:
           the rolling cache streams past the trained length, and a decoder that only saw `frames`
           drifts over a long stream (its colours warm); decoder_long_stage.steps 0 skips it
           -> vae.npz, decoder_long.json
  teacher  teacher forcing on the VAE's latents, the umT5 encoder trained jointly through the loss
           with caption dropout (`train/text_conditioning.py`) -> teacher_dit.npz, text.npz
  student  a pool of the teacher's streamed ODE trajectories with classifier-free guidance
           (`causal_ode_trajectory`), then ODE regression of the student (initialised from the teacher)
           onto the 4-step schedule with clean context (`OdeRegression(clean_context=True)`) -> student_dit.npz
  dmd      Self-Forcing DMD of the student (`train/dmd.py`) on its own KV-cached rollouts, the teacher
           as the real score and a critic started from it; dmd_stage.steps 0 skips it -> dmd.json
           (and dmd_dit.npz when it ran)
  export   the shippable model: embedded/{dit,text,vae}.npz + config.json (`embedded.load_embedded`)
Clips are drawn on the accelerator (`render_batch`) from labels drawn on the host, seeded by (seed,
stage, step), so a resumed stage sees the batches it would have seen. A stage stopped by the time
budget either checkpoints and ends the process (resume by running again) or, with finish_early,
writes its result from the EMA weights so far; the steps run are recorded in the export's config.

    python -m causal_dit_jax.train.recipe --config recipes/embedded_default.json --out runs/default
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.model.config import ConfigFields, InferenceConfig

STAGES = ("vae", "decoder", "decoder_long", "teacher", "student", "dmd", "export")
STAGE_SEEDS = {"vae": 0, "decoder": 1, "teacher": 2, "student": 3, "dmd": 4, "export": 5, "decoder_long": 6}  # data streams
DEPENDS = {  # the stages whose results each stage is made from
    "vae": (),
    "decoder": ("vae",),
    "decoder_long": ("decoder",),
    "teacher": ("vae",),
    "student": ("teacher",),
    "dmd": ("student",),
    "export": ("vae", "decoder", "decoder_long", "teacher", "student", "dmd"),
}


@dataclasses.dataclass(frozen=True)
class StageConfig(ConfigFields):
    """One stage's optimisation: AdamW (b1 0.9, b2 0.99) with warmup then a constant rate, clipping,
    an EMA of the weights (the result). max_seconds: the stage also ends (with its result) after that
    much training time, whichever comes first (None: steps alone). scan_unroll: the DiT stages' layer
    loop, layers per iteration (`KernelConfig.scan_unroll`; the DiT's num_layers unrolls it: a small
    model's steps run faster in less memory, without the scan's stacked residuals); 1 for the VAE's.
    long_every / short_batch_size: the teacher's and student's mix of clip lengths: every long_every-th
    step trains on train_frames clips at batch_size, the steps between on the first `frames` of the
    same clips (the default video's length; a causal VAE's latents and a streamed trajectory crop
    exactly) at short_batch_size (None: batch_size); 1: every step long."""

    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    clip_norm: float = 1.0
    weight_decay: float = 0.01
    max_seconds: float | None = None
    scan_unroll: int = 1
    long_every: int = 1
    short_batch_size: int | None = None

    def __post_init__(self):
        from causal_dit_jax.model.config import KernelConfig

        KernelConfig(scan_unroll=self.scan_unroll)  # its check, before any stage runs
        if not isinstance(self.long_every, int) or self.long_every < 1:
            raise ValueError(f"long_every must be a positive int (1: every step on train_frames), got {self.long_every!r}")
        if self.short_batch_size is not None and self.short_batch_size < 1:
            raise ValueError(f"short_batch_size must be >= 1 (or None: batch_size), got {self.short_batch_size}")

    def clips(self, step: int, frames: int, long_frames: int) -> tuple[int, int]:
        """(batch, latent frames) of step `step`: long_frames at batch_size on every long_every-th step,
        else frames at short_batch_size."""
        if step % self.long_every == self.long_every - 1:
            return self.batch_size, long_frames
        return (self.batch_size if self.short_batch_size is None else self.short_batch_size), frames

    def optimizer(self):
        from causal_dit_jax.train.config import OptimizerConfig

        return OptimizerConfig(
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps,
            schedule="constant",
            total_steps=self.steps,
            b1=0.9,
            b2=0.99,
            weight_decay=self.weight_decay,
            clip_norm=self.clip_norm,
            ema_decay=self.ema_decay,
        )


@dataclasses.dataclass(frozen=True)
class RecipeConfig(ConfigFields):
    """The whole recipe. frames / height / width: the default video (and the decoder's and DMD's
    clips); train_frames: the teacher's and student's clips (None: frames), longer than the window to
    learn what a rolling cache shows past it; local_attn_size / sink_size: that rolling view in latent
    frames (Self-Forcing's; -1 / 0: every earlier frame), trained by teacher forcing and the student's
    regression, used by the teacher's trajectories and exported as the model's window; dit / text /
    vae: preset names; vae_frames: the autoencoder's clip length (1 + 4k); decoder_long_frames: the
    decoder_long stage's clips (1 + 4k, longer than frames; its decoder_long_stage.steps 0: no such
    round); latent_pool: clips encoded
    once for the teacher (0: fresh clips every step);
    trajectories: the distillation pool, drawn trajectory_batch at a time with ode_steps Euler steps
    per segment of the 4-step schedule and guidance_scale. timestep_shift: the flow-matching schedule's
    shift for every stage of the DiT (training table, teacher ODE, the student's 4 steps), exported as
    the model's sampling shift (Wan's 5). dmd_*: the DMD stage's critic (its AdamW rate, its updates per
    generator update: Self-Forcing's 5) and the teacher's guidance as the real score."""

    frames: int = 33
    train_frames: int | None = None
    local_attn_size: int = -1
    sink_size: int = 0
    height: int = 128
    width: int = 192
    dit: str = "procedural"
    text: str = "procedural"
    vae: str = "tiny"
    seed: int = 0
    vae_frames: int = 9
    kl_weight: float = 1e-4
    statistics_clips: int = 256
    latent_pool: int = 8192
    caption_dropout: float = 0.1
    trajectories: int = 2048
    trajectory_batch: int = 128
    ode_steps: tuple[int, ...] = (2, 2, 4, 16)
    guidance_scale: float = 2.5
    timestep_shift: float = 5.0
    save_every: int = 500
    log_every: int = 50
    vae_stage: StageConfig = StageConfig(steps=1500, batch_size=16, learning_rate=1e-3, ema_decay=0.99)
    decoder_stage: StageConfig = StageConfig(steps=1000, batch_size=8, learning_rate=5e-4, ema_decay=0.99)
    decoder_long_frames: int = 129
    decoder_long_stage: StageConfig = StageConfig(steps=0, batch_size=2, learning_rate=2e-4, warmup_steps=20, ema_decay=0.99)
    teacher_stage: StageConfig = StageConfig(steps=4000, batch_size=32, learning_rate=3e-4)
    student_stage: StageConfig = StageConfig(steps=2000, batch_size=32, learning_rate=1e-4, warmup_steps=50)
    dmd_stage: StageConfig = StageConfig(steps=0, batch_size=16, learning_rate=2e-5, warmup_steps=20, ema_decay=0.99)
    dmd_critic_learning_rate: float = 2e-5
    dmd_critic_steps: int = 5
    dmd_guidance_scale: float = 3.0

    def __post_init__(self):
        object.__setattr__(self, "ode_steps", tuple(int(n) for n in self.ode_steps))
        for name in ("vae_stage", "decoder_stage", "decoder_long_stage", "teacher_stage", "student_stage", "dmd_stage"):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, StageConfig.from_dict(value))
        if (self.frames - 1) % 4 or (self.vae_frames - 1) % 4 or (self.dit_frames - 1) % 4:
            raise ValueError(
                f"frames ({self.frames}), train_frames ({self.train_frames}) and vae_frames ({self.vae_frames}) must be 1 + 4k"
            )
        if self.decoder_long_stage.steps and ((self.decoder_long_frames - 1) % 4 or self.decoder_long_frames <= self.frames):
            raise ValueError(
                f"decoder_long_frames ({self.decoder_long_frames}) must be 1 + 4k and longer than frames ({self.frames})"
            )
        if self.dit_frames < self.frames:
            raise ValueError(f"train_frames ({self.train_frames}) must be at least frames ({self.frames})")
        from causal_dit_jax.train.block_attention import check_window

        check_window(InferenceConfig().frames_per_chunk, self.local_attn_size, self.sink_size)  # before the sampler's own check
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {self.height}x{self.width}")
        for name in ("vae_stage", "decoder_stage", "decoder_long_stage"):
            if getattr(self, name).scan_unroll != 1:
                raise ValueError(f"{name}.scan_unroll must be 1: the VAE has no layer loop (the DiT stages' setting)")
        for name in ("vae_stage", "decoder_stage", "decoder_long_stage", "dmd_stage"):
            stage = getattr(self, name)
            if stage.long_every != 1 or stage.short_batch_size is not None:
                raise ValueError(f"{name} has one clip length: long_every and short_batch_size are the teacher's and student's")
        for name in ("teacher_stage", "student_stage"):
            if getattr(self, name).long_every > 1 and self.dit_frames == self.frames:
                raise ValueError(
                    f"{name}.long_every mixes train_frames clips with shorter ones: set train_frames longer than frames"
                )
        if self.dmd_critic_steps < 1:
            raise ValueError(f"dmd_critic_steps must be >= 1, got {self.dmd_critic_steps}")
        if self.trajectories % self.trajectory_batch:
            raise ValueError(f"trajectories ({self.trajectories}) must be whole batches of {self.trajectory_batch}")

    def inference(self) -> InferenceConfig:
        """The sampler's settings the DiT stages train and distill for (the 4-step list, the shift)."""
        return InferenceConfig(timestep_shift=self.timestep_shift, **self.window)

    @property
    def window(self) -> dict[str, int]:
        """The rolling view the DiT's stages train under, as the configs take it (local_attn_size, sink_size)."""
        return {"local_attn_size": self.local_attn_size, "sink_size": self.sink_size}

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frames - 1) // 4

    @property
    def dit_frames(self) -> int:
        """The teacher's and student's clip length in frames (train_frames, else frames)."""
        return self.frames if self.train_frames is None else self.train_frames

    @property
    def dit_latent_frames(self) -> int:
        return 1 + (self.dit_frames - 1) // 4

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> RecipeConfig:
        p = pathlib.Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"recipe config {p} does not exist")
        return cls.from_dict(json.loads(p.read_text()))

    def configs(self):
        """(ModelConfig, T5Config, VAEConfig) of the presets."""
        from causal_dit_jax.autoencoders.wan_vae import get_vae_preset
        from causal_dit_jax.model.config import get_preset
        from causal_dit_jax.text.umt5 import get_t5_preset

        dit, text, vae = get_preset(self.dit), get_t5_preset(self.text), get_vae_preset(self.vae)
        if dit.text_dim != text.dim or dit.text_len != text.text_len or dit.in_dim != vae.z_dim:
            raise ValueError(
                f"presets do not fit: DiT text {dit.text_dim}x{dit.text_len} vs umT5 {text.dim}x{text.text_len}, "
                f"DiT in_dim {dit.in_dim} vs VAE z_dim {vae.z_dim}"
            )
        return dit, text, vae


# ---------------------------------------------------------------------- the stage loop
class StageStopped(Exception):
    """The time budget ended a stage before its last step (its checkpoint is on disk)."""


def _stage_rng(config: RecipeConfig, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, STAGE_SEEDS[stage], step])


def _run_stage(
    name, out, trainer, params, next_batch, stage: StageConfig, config: RecipeConfig, deadline, finish_early, progress
):
    """Train to stage.steps from `params` (or the stage's latest checkpoint); returns (state, steps run).
    At the deadline: checkpoint, then StageStopped, or with finish_early return the state so far."""
    from tqdm import tqdm

    from causal_dit_jax.train.checkpoints import RunCheckpoints
    from causal_dit_jax.train.run import save_loss_curve

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    metrics_path = folder / "metrics.jsonl"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    capped = None if stage.max_seconds is None else time.time() + stage.max_seconds
    if capped is not None and (deadline is None or capped < deadline):
        deadline, finish_early = capped, True  # the stage's own time cap ends it with its result
    with RunCheckpoints(folder / "checkpoints", keep=2, save_every=config.save_every) as ckpts:
        if ckpts.latest_step() is not None:
            abstract = jax.eval_shape(lambda p: trainer.init_state(p, config.seed), params)
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
            state, _, _ = ckpts.restore(abstract)
        else:
            state = trainer.init_state(params, config.seed)
        step = trainer.step_of(state)
        if ckpts.latest_step() is not None:
            print(f"{name}: resumed at step {step}", flush=True)
        bar = tqdm(total=stage.steps, initial=step, desc=name, unit="step", disable=not progress)
        t_last = time.perf_counter()
        while step < stage.steps:
            state, metrics = trainer.step(state, next_batch(step))
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == stage.steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                row = {"step": step, **m, "step_s": (now - t_last) / config.log_every}
                t_last = now
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{m['loss']:.4f}")
            out_of_time = deadline is not None and time.time() > deadline
            if step % config.save_every == 0 or step == stage.steps or out_of_time:
                if step not in ckpts.all_steps():
                    ckpts.save(step, state, {"step": step}, config.to_dict(), force=True)
                save_loss_curve(metrics_path, folder / "loss.png") if metrics_path.exists() else None
            if out_of_time and step < stage.steps:
                bar.close()
                if finish_early:
                    print(f"{name}: the time budget ended it at step {step} of {stage.steps}", flush=True)
                    return state, step
                raise StageStopped(f"{name} stopped at step {step} of {stage.steps}; run again to resume")
        bar.close()
    return state, step


def _rounds(out: pathlib.Path, stage: str) -> list[int]:
    """The steps of each round a stage's result has had (its {stage}.json)."""
    done = json.loads((out / f"{stage}.json").read_text())
    return list(done.get("rounds", [done["steps"]]))


def stage_seconds(out: pathlib.Path) -> dict[str, float]:
    """Wall seconds each stage of a run folder has taken so far, summed over the processes that ran it
    (compilation, pools and checkpoints included; the stage's rounds added up)."""
    path = pathlib.Path(out) / "seconds.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _add_seconds(out: pathlib.Path, stage: str, seconds: float, restart: bool) -> None:
    """Add a process's time on a stage to seconds.json (restart: the stage began afresh, its old time dropped)."""
    totals = stage_seconds(out)
    totals[stage] = (0.0 if restart else totals.get(stage, 0.0)) + round(seconds, 1)
    _write_json(out / "seconds.json", totals)


def _write_json(path: pathlib.Path, value) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


# ---------------------------------------------------------------------- stages
def train_vae(config: RecipeConfig, out: pathlib.Path, deadline=None, finish_early=False, progress=True) -> dict:
    """The autoencoder stage -> vae.npz ({'encoder', 'decoder'} EMA weights) and vae_config.json."""
    from causal_dit_jax.param_archive import save_params
    from causal_dit_jax.train.autoencoder import (
        AutoencoderConfig,
        AutoencoderObjective,
        latent_statistics,
        with_latent_statistics,
    )
    from causal_dit_jax.train.procedural import draw_labels, render_batch
    from causal_dit_jax.train.trainer import Trainer

    _, _, vae = config.configs()
    objective = AutoencoderObjective(vae.replace(per_frame_stages=0), AutoencoderConfig(kl_weight=config.kl_weight))
    stage = config.vae_stage
    trainer = Trainer(objective, stage.optimizer())
    render = jax.jit(lambda labels: render_batch(labels, config.vae_frames, config.height, config.width))

    def next_batch(step):
        labels, _ = draw_labels(_stage_rng(config, "vae", step), stage.batch_size, config.height, config.width)
        return {"frames": render(labels)}

    state, steps = _run_stage(
        "vae",
        out,
        trainer,
        objective.init(jax.random.key(config.seed)),
        next_batch,
        stage,
        config,
        deadline,
        finish_early,
        progress,
    )
    params = state["ema"]
    render_full = jax.jit(lambda labels: render_batch(labels, config.frames, config.height, config.width))
    rng = np.random.default_rng([config.seed, 99])
    clips = (
        render_full(draw_labels(rng, 32, config.height, config.width)[0]) for _ in range(max(1, config.statistics_clips // 32))
    )
    mean, std = latent_statistics(objective.encoder, params["encoder"], clips)
    save_params(out / "vae.npz", params)
    _write_json(out / "vae_config.json", {"vae": with_latent_statistics(vae, mean, std).to_dict(), "steps": steps})
    return {"steps": steps}


def train_decoder(
    config: RecipeConfig, out: pathlib.Path, deadline=None, finish_early=False, progress=True, extend=False
) -> dict:
    """The decoder fine-tune on `frames`-frame clips (decoder_stage) -> vae.npz's decoder, decoder.json
    (extend: another round from the fine-tuned decoder)."""
    rounds = _rounds(out, "decoder") if extend else []
    name = "decoder" if not rounds else f"decoder_round{len(rounds) + 1}"
    steps = _decoder_round(config, out, name, "decoder", config.decoder_stage, config.frames, deadline, finish_early, progress)
    rounds = [*rounds, steps]
    _write_json(out / "decoder.json", {"steps": sum(rounds), "rounds": rounds})
    return {"steps": steps, "rounds": rounds}


def train_decoder_long(config: RecipeConfig, out: pathlib.Path, deadline=None, finish_early=False, progress=True) -> dict:
    """The decoder's round on decoder_long_frames clips (decoder_long_stage), from the decoder stage's
    result -> vae.npz's decoder, decoder_long.json; steps 0: decoder_long.json alone."""
    stage = config.decoder_long_stage
    steps = 0
    if stage.steps:
        steps = _decoder_round(
            config, out, "decoder_long", "decoder_long", stage, config.decoder_long_frames, deadline, finish_early, progress
        )
    _write_json(out / "decoder_long.json", {"steps": steps, "frames": config.decoder_long_frames})
    return {"steps": steps}


def _decoder_round(config, out, name, stream, stage: StageConfig, frames: int, deadline, finish_early, progress) -> int:
    """Train vae.npz's decoder on `frames`-frame clips for `stage` (checkpoints in out/name, batches
    from the `stream` stage's data seed), the encoder frozen; write the EMA decoder back; its steps."""
    from causal_dit_jax.param_archive import save_params
    from causal_dit_jax.train.autoencoder import AutoencoderConfig, DecoderObjective
    from causal_dit_jax.train.procedural import draw_labels, render_batch
    from causal_dit_jax.train.trainer import Trainer

    vae, _, _, params = _vae_from(out)
    objective = DecoderObjective(vae.replace(per_frame_stages=0), params["encoder"], AutoencoderConfig(kl_weight=0.0))
    trainer = Trainer(objective, stage.optimizer())
    render = jax.jit(lambda labels: render_batch(labels, frames, config.height, config.width))  # [B, frames, H, W, 3]

    def next_batch(step):
        labels, _ = draw_labels(_stage_rng(config, stream, step), stage.batch_size, config.height, config.width)
        return {"frames": render(labels)}

    state, steps = _run_stage(
        name, out, trainer, {"decoder": params["decoder"]}, next_batch, stage, config, deadline, finish_early, progress
    )
    save_params(out / "vae.npz", {"encoder": params["encoder"], "decoder": state["ema"]["decoder"]})
    return steps


def _vae_from(out: pathlib.Path):
    from causal_dit_jax.autoencoders.wan_vae import VAEConfig, WanVAE
    from causal_dit_jax.autoencoders.wan_vae_encoder import WanVAEEncoder
    from causal_dit_jax.param_archive import load_params

    vae = VAEConfig.from_dict(json.loads((out / "vae_config.json").read_text())["vae"])
    encoder, decoder = WanVAEEncoder(vae), WanVAE(vae)
    abstract = {"encoder": encoder.abstract_params(), "decoder": decoder.abstract_params()}
    return vae, encoder, decoder, jax.tree.map(jnp.asarray, load_params(out / "vae.npz", abstract))


def _tokenizer(config: RecipeConfig):
    from causal_dit_jax.text.tokenizer import ByteTokenizer

    return ByteTokenizer(max_length=config.configs()[1].text_len)


def _captions(tokenizer, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = tokenizer(captions)
    return np.asarray(ids), np.asarray(mask)


def train_teacher(
    config: RecipeConfig, out: pathlib.Path, deadline=None, finish_early=False, progress=True, extend=False
) -> dict:
    """Teacher forcing with the umT5 encoder trained jointly -> teacher_dit.npz, text.npz (EMA).

    Clips of train_frames under the rolling view (local_attn_size / sink_size). The clips of a latent
    pool (`latent_pool` of them, encoded once: the VAE's encoder costs more per clip than the DiT's
    step; kept in the stage's folder for a resumed process) are drawn at random, or with latent_pool 0
    fresh clips every step.
    extend: continue from the stage's result (its EMA weights, a fresh optimiser) for another
    teacher_stage round, in its own checkpoint folder; teacher.json lists the rounds' steps."""
    from causal_dit_jax.param_archive import save_params
    from causal_dit_jax.text.umt5 import UMT5Encoder
    from causal_dit_jax.train.config import ObjectiveConfig
    from causal_dit_jax.train.objectives import FlowObjective
    from causal_dit_jax.train.procedural import draw_labels, render_batch
    from causal_dit_jax.train.run_objectives import training_dit
    from causal_dit_jax.train.text_conditioning import JointTextObjective, empty_caption
    from causal_dit_jax.train.trainer import Trainer

    dit_cfg, t5_cfg, _ = config.configs()
    _, encoder, _, vae_params = _vae_from(out)
    stage = config.teacher_stage
    dit = training_dit(dit_cfg, stage.scan_unroll)  # float32 master weights, bf16 compute
    t5 = UMT5Encoder(t5_cfg.replace(param_dtype="float32"))
    tok = _tokenizer(config)
    objective = JointTextObjective(
        FlowObjective(dit, ObjectiveConfig(shift=config.timestep_shift, **config.window)),
        t5,
        *empty_caption(tok),
        config.caption_dropout,
    )
    trainer = Trainer(objective, stage.optimizer())

    @functools.partial(jax.jit, static_argnums=1)
    def latents_of(labels, num_frames):
        frames = render_batch(labels, num_frames, config.height, config.width)
        cache = encoder.init_encode_cache(frames.shape[0], config.height, config.width)
        return encoder.encode_chunk(vae_params["encoder"], frames, cache)[0]  # b f h w z

    def fresh(rng, n, latent_frames=config.dit_latent_frames):
        labels, captions = draw_labels(rng, n, config.height, config.width)
        ids, mask = _captions(tok, captions)
        return {"latents": latents_of(labels, 1 + 4 * (latent_frames - 1)), "ids": ids, "mask": mask}

    def clips(step):  # (batch, latent frames) of the step
        return stage.clips(step, config.latent_frames, config.dit_latent_frames)

    if config.latent_pool:
        pool = _latent_pool(config, out / "teacher" / "latent_pool.npz", fresh, progress)  # goes with a stale teacher

        @functools.partial(jax.jit, static_argnums=2)
        def take(pool, idx, latent_frames):  # the first latent_frames of each clip: its shorter clip's latents
            return {"latents": pool["latents"][idx, :latent_frames], "ids": pool["ids"][idx], "mask": pool["mask"][idx]}

        def next_batch(step):
            batch, latent_frames = clips(step)
            idx = _stage_rng(config, "teacher", step).integers(0, config.latent_pool, batch)
            return take(pool, jnp.asarray(idx), latent_frames)
    else:

        def next_batch(step):
            return fresh(_stage_rng(config, "teacher", step), *clips(step))

    rounds = []
    if extend:
        rounds = _rounds(out, "teacher")
        _, _, dit_params, text_params = _teacher_from(out, config)
        params = {"dit": dit_params, "text": text_params}
    else:
        k_dit, k_text = jax.random.split(jax.random.key(config.seed + 1))
        params = {"dit": dit.init(k_dit), "text": t5.init(k_text)}
    name = "teacher" if not rounds else f"teacher_round{len(rounds) + 1}"
    state, steps = _run_stage(name, out, trainer, params, next_batch, stage, config, deadline, finish_early, progress)
    save_params(out / "teacher_dit.npz", state["ema"]["dit"], dit_cfg.param_dtype)
    save_params(out / "text.npz", state["ema"]["text"], t5_cfg.param_dtype)
    rounds = [*rounds, steps]
    _write_json(out / "teacher.json", {"steps": sum(rounds), "rounds": rounds})
    return {"steps": steps, "rounds": rounds}


def _latent_pool(config: RecipeConfig, path: pathlib.Path, fresh, progress: bool) -> dict:
    """The teacher's pool {'latents' [N, F, h, w, z], 'ids', 'mask'} as device arrays: read from `path`
    when an earlier process of this run built it, else encoded 128 clips at a time and saved there
    (written whole, then renamed: a stopped process leaves no partial pool)."""
    from tqdm import tqdm

    if path.exists():
        with np.load(path) as saved:
            return {k: jnp.asarray(saved[k]) for k in saved.files}
    size = 128
    parts = [
        jax.device_get(fresh(np.random.default_rng([config.seed, 55, j]), size))
        for j in tqdm(range(-(-config.latent_pool // size)), desc="latent pool", disable=not progress)
    ]
    pool = {k: np.concatenate([p[k] for p in parts])[: config.latent_pool] for k in parts[0]}
    del parts
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with tmp.open("wb") as fh:
        np.savez(fh, **pool)
    tmp.replace(path)
    return {k: jnp.asarray(v) for k, v in pool.items()}


def _teacher_from(out: pathlib.Path, config: RecipeConfig, scan_unroll: int = 1):
    """(dit, text encoder, their params as float32 device arrays) of the teacher stage's result; the
    DiT runs `scan_unroll` layers per iteration (the reading stage's setting)."""
    from causal_dit_jax.param_archive import load_params
    from causal_dit_jax.text.umt5 import UMT5Encoder
    from causal_dit_jax.train.run_objectives import training_dit

    dit_cfg, t5_cfg, _ = config.configs()
    dit, t5 = training_dit(dit_cfg, scan_unroll), UMT5Encoder(t5_cfg.replace(param_dtype="float32"))

    def f32(tree):
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)

    return (
        dit,
        t5,
        f32(load_params(out / "teacher_dit.npz", dit.abstract_params())),
        f32(load_params(out / "text.npz", t5.abstract_params())),
    )


def teacher_generate(config: RecipeConfig, out: pathlib.Path):
    """generate(prompts, seed, frames, height, width) -> uint8 [B, F, H, W, 3] with the many-step
    teacher: its guided streamed ODE (the distillation's targets), decoded by the VAE."""
    from causal_dit_jax.model.sampler import initial_noise
    from causal_dit_jax.train.text_conditioning import empty_caption

    dit, t5, dit_params, text_params = _teacher_from(out, config)
    _, _, decoder, vae_params = _vae_from(out)
    tok = _tokenizer(config)
    inference = config.inference()
    null_ids, null_mask = (a[None] for a in empty_caption(tok))

    @jax.jit
    def run(ids, mask, noise):
        text = dit.encode_text(dit_params, t5.text_context(text_params, ids, mask))
        b = ids.shape[0]
        neg = dit.encode_text(dit_params, t5.text_context(text_params, jnp.repeat(null_ids, b, 0), jnp.repeat(null_mask, b, 0)))
        return trajectory_end(dit, dit_params, noise, text, neg, config, inference)

    def generate(prompts, seed, frames, height, width):
        ids, mask = _captions(tok, list(prompts))
        latent_frames = 1 + (frames - 1) // 4
        noise = initial_noise(jax.random.key(seed), len(prompts), latent_frames, height // 8, width // 8, dit.config.in_dim)
        latents = run(ids, mask, noise)
        video = decoder.decode(vae_params["decoder"], latents)
        return np.asarray(jnp.round((jnp.clip(video, -1, 1) + 1) * 127.5)).astype(np.uint8)

    return generate


def trajectory_end(dit, params, noise, text, negative_text, config: RecipeConfig, inference: InferenceConfig):
    """The guided teacher's streamed ODE end (clean latents) from noise."""
    from causal_dit_jax.train.distill import causal_ode_trajectory

    return causal_ode_trajectory(
        dit, params, noise, text, inference, config.ode_steps, guidance_scale=config.guidance_scale, negative_text=negative_text
    )[:, -1]


def train_student(
    config: RecipeConfig, out: pathlib.Path, deadline=None, finish_early=False, progress=True, extend=False
) -> dict:
    """The trajectory pool, then ODE regression of the 4-step student -> student_dit.npz (EMA)
    (extend: another round from the student's result, on the same pool)."""
    from tqdm import tqdm

    from causal_dit_jax.param_archive import save_params
    from causal_dit_jax.train.distill import OdeRegression, causal_ode_trajectory, record_sigmas
    from causal_dit_jax.train.procedural import draw_labels
    from causal_dit_jax.train.text_conditioning import empty_caption
    from causal_dit_jax.train.trainer import Trainer

    dit, t5, dit_params, text_params = _teacher_from(out, config, config.student_stage.scan_unroll)
    tok = _tokenizer(config)
    inference = config.inference()
    null_ids, null_mask = empty_caption(tok)
    h, w, f = config.height // 8, config.width // 8, config.dit_latent_frames  # trajectories of train_frames

    @jax.jit
    def pool_batch(ids, mask, key):
        b = ids.shape[0]
        states = t5.text_context(text_params, ids, mask)
        empty = t5.text_context(text_params, jnp.broadcast_to(null_ids, ids.shape), jnp.broadcast_to(null_mask, mask.shape))
        noise = jax.random.normal(key, (b, f, h, w, dit.config.in_dim), jnp.float32)
        traj = causal_ode_trajectory(
            dit,
            dit_params,
            noise,
            dit.encode_text(dit_params, states),
            inference,
            config.ode_steps,
            guidance_scale=config.guidance_scale,
            negative_text=dit.encode_text(dit_params, empty),
        )
        return traj, states

    trajectories, texts = [], []
    n = config.trajectories // config.trajectory_batch
    for j in tqdm(range(n), desc="trajectories", disable=not progress):
        _, captions = draw_labels(
            np.random.default_rng([config.seed, 77, j]), config.trajectory_batch, config.height, config.width
        )
        ids, mask = _captions(tok, captions)
        traj, states = pool_batch(ids, mask, jax.random.fold_in(jax.random.key(config.seed + 2), j))
        trajectories.append(traj)
        texts.append(states)
    pool = {"trajectory": jnp.concatenate(trajectories), "text": jnp.concatenate(texts)}
    del trajectories, texts
    stage = config.student_stage
    trainer = Trainer(OdeRegression(dit, record_sigmas(inference), clean_context=True, **config.window), stage.optimizer())

    @functools.partial(jax.jit, static_argnums=2)
    def take(pool, idx, latent_frames):  # a streamed trajectory's first frames: the shorter clip's trajectory
        return {"trajectory": pool["trajectory"][idx, :, :latent_frames], "text": pool["text"][idx]}

    def next_batch(step):
        batch, latent_frames = stage.clips(step, config.latent_frames, config.dit_latent_frames)
        idx = _stage_rng(config, "student", step).integers(0, config.trajectories, batch)
        return take(pool, jnp.asarray(idx), latent_frames)

    rounds, init = [], dit_params
    if extend:
        from causal_dit_jax.param_archive import load_params

        rounds = _rounds(out, "student")
        init = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), load_params(out / "student_dit.npz", dit.abstract_params()))
    name = "student" if not rounds else f"student_round{len(rounds) + 1}"
    state, steps = _run_stage(name, out, trainer, init, next_batch, stage, config, deadline, finish_early, progress)
    save_params(out / "student_dit.npz", state["ema"], config.configs()[0].param_dtype)
    rounds = [*rounds, steps]
    _write_json(out / "student.json", {"steps": sum(rounds), "rounds": rounds})
    return {"steps": steps, "rounds": rounds}


class _DmdStage:
    """`DMDTrainer` in the stage loop's terms: params {'generator', 'critic'}, a batch of text states,
    negative states and noise; the result is the generator's EMA."""

    def __init__(self, dmd_trainer, teacher_params, seed: int):
        self.dmd_trainer, self.teacher_params, self.seed = dmd_trainer, teacher_params, seed

    def init_state(self, params, seed: int) -> dict:
        return self.dmd_trainer.init_state(params["generator"], params["critic"], seed)

    def step(self, state, batch):
        state, metrics = self.dmd_trainer.step(state, self.teacher_params, batch, self.seed)
        return state, {**{k: v for k, v in metrics.items() if k != "exit_step"}, "loss": metrics["generator_loss"]}

    @staticmethod
    def step_of(state) -> int:
        return int(state["generator"]["step"])


def train_dmd(config: RecipeConfig, out: pathlib.Path, deadline=None, finish_early=False, progress=True) -> dict:
    """Self-Forcing DMD from the student -> dmd_dit.npz (the generator's EMA), dmd.json. The teacher
    (causal: each chunk scored after the clean generated chunks before it, as teacher forcing trained
    it) is the real score with dmd_guidance_scale, the critic starts from it; prompts are drawn per
    step, the text encoder frozen. steps 0: dmd.json alone."""
    stage = config.dmd_stage
    if stage.steps == 0:
        (out / "dmd_dit.npz").unlink(missing_ok=True)
        _write_json(out / "dmd.json", {"steps": 0})
        return {"steps": 0}
    from causal_dit_jax.param_archive import load_params, save_params
    from causal_dit_jax.train.dmd import DMD, DMDConfig, DMDTrainer
    from causal_dit_jax.train.procedural import draw_labels
    from causal_dit_jax.train.text_conditioning import empty_caption

    dit, t5, teacher_params, text_params = _teacher_from(out, config, stage.scan_unroll)
    student = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), load_params(out / "student_dit.npz", dit.abstract_params()))
    tok = _tokenizer(config)
    f, h, w = config.latent_frames, config.height // 8, config.width // 8
    scores = DMDConfig(config.dmd_guidance_scale, shift=config.timestep_shift, score_attention="causal")
    dmd = DMD(dit, dit, dit, scores, config.inference())
    critic_optimizer = dataclasses.replace(stage.optimizer(), learning_rate=config.dmd_critic_learning_rate)
    trainer = _DmdStage(
        DMDTrainer(dmd, stage.optimizer(), critic_optimizer, config.dmd_critic_steps), teacher_params, config.seed
    )
    null_ids, null_mask = (a[None] for a in empty_caption(tok))
    encode = jax.jit(lambda ids, mask: t5.text_context(text_params, ids, mask))
    negative = encode(null_ids, null_mask)

    def next_batch(step):
        _, captions = draw_labels(_stage_rng(config, "dmd", step), stage.batch_size, config.height, config.width)
        text = encode(*_captions(tok, captions))
        noise = jax.random.normal(
            jax.random.fold_in(jax.random.key(config.seed + 3), step), (stage.batch_size, f, h, w, dit.config.in_dim)
        )
        return {"text": text, "negative_text": jnp.broadcast_to(negative, text.shape), "noise": noise}

    params = {"generator": student, "critic": teacher_params}
    state, steps = _run_stage("dmd", out, trainer, params, next_batch, stage, config, deadline, finish_early, progress)
    save_params(out / "dmd_dit.npz", state["generator"]["ema"], config.configs()[0].param_dtype)
    _write_json(out / "dmd.json", {"steps": steps})
    return {"steps": steps}


def export(
    config: RecipeConfig, out: pathlib.Path, target: pathlib.Path | None = None, notes: dict | None = None
) -> pathlib.Path:
    """The shippable embedded model: target (default out/embedded) with dit.npz, text.npz, vae.npz
    and config.json (the configs, the tokenizer, the default size, the recipe and the steps run)."""
    import shutil

    dit_cfg, t5_cfg, _ = config.configs()
    vae = json.loads((out / "vae_config.json").read_text())
    target = out / "embedded" if target is None else pathlib.Path(target)
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dmd_steps = json.loads((out / "dmd.json").read_text())["steps"] if (out / "dmd.json").exists() else 0
    shutil.copy(out / ("dmd_dit.npz" if dmd_steps else "student_dit.npz"), tmp / "dit.npz")
    shutil.copy(out / "text.npz", tmp / "text.npz")
    shutil.copy(out / "vae.npz", tmp / "vae.npz")
    steps = {"vae": vae["steps"]}
    steps |= {s: json.loads((out / f"{s}.json").read_text())["steps"] for s in ("decoder", "teacher", "student")}
    steps["rounds"] = {s: _rounds(out, s) for s in ("decoder", "teacher", "student")}
    steps["dmd"] = dmd_steps
    long = out / "decoder_long.json"
    steps["decoder_long"] = json.loads(long.read_text())["steps"] if long.exists() else 0
    meta = {
        "dit": dit_cfg.to_dict(),
        "t5": t5_cfg.to_dict(),
        "vae": vae["vae"],
        "tokenizer": {"kind": "byte", "max_length": t5_cfg.text_len},
        "default_size": {"frames": config.frames, "height": config.height, "width": config.width},
        "sampling": {"timestep_shift": config.timestep_shift},
        **({"rolling": config.window} if config.local_attn_size != -1 else {}),  # the window it trained under
        "recipe": config.to_dict(),
        "steps_run": steps,
        "stage_seconds": stage_seconds(out),  # wall time per stage, summed over the processes that ran it
        **(notes or {}),
    }
    _write_json(tmp / "config.json", meta)
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return target


def run_recipe(
    config: RecipeConfig,
    out: str | pathlib.Path,
    stages: tuple[str, ...] = STAGES,
    budget_s: float | None = None,
    finish_early: bool = False,
    progress: bool = True,
    extend: tuple[str, ...] = (),
) -> dict:
    """Run the stages whose results are missing, in order, within budget_s seconds (None: no limit);
    extend (of 'decoder', 'teacher', 'student'): run that stage another round from its result. A
    stage made from a result made again now (`DEPENDS`) is run again. Returns {stage: {'steps',
    'seconds', ...}} of the stages run now."""
    unknown = [s for s in (*stages, *extend) if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; expected some of {list(STAGES)}")
    if any(s in extend for s in ("vae", "decoder_long", "dmd", "export")):
        raise ValueError(f"the decoder, teacher and student stages extend, not {list(extend)}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "recipe.json"
    if saved.exists() and RecipeConfig.from_dict(json.loads(saved.read_text())) != config:  # fields added since: defaults
        raise ValueError(f"{out} holds a recipe run with another config ({saved}); use a new folder")
    _write_json(saved, config.to_dict())
    deadline = None if budget_s is None else time.time() + budget_s
    done = {
        "vae": "vae.npz",
        "decoder": "decoder.json",
        "decoder_long": "decoder_long.json",
        "teacher": "text.npz",
        "student": "student_dit.npz",
        "dmd": "dmd.json",
        "export": "embedded/config.json",
    }
    runners = {
        "vae": train_vae,
        "decoder": train_decoder,
        "decoder_long": train_decoder_long,
        "teacher": train_teacher,
        "student": train_student,
        "dmd": train_dmd,
    }
    report = {}
    for stage in stages:
        extending = stage in extend and (out / done[stage]).exists()
        stale = any(d in report for d in DEPENDS[stage])  # what it is made from was made again now
        if (out / done[stage]).exists() and not (extending or stale):
            continue
        if stale and not extending and (out / stage).exists():
            import shutil

            shutil.rmtree(out / stage)  # its checkpoints trained on a stale result
        start = time.time()
        if stage == "export":
            export(config, out)
            report[stage] = {"seconds": time.time() - start}
            continue
        kw = {"extend": True} if extending else {}
        fresh = not extending and not (out / stage).exists()  # no checkpoints: its earlier time is not in it
        try:
            result = runners[stage](config, out, deadline, finish_early, progress, **kw)
        finally:  # a stopped stage's time counts too: the recipe's cost summed over its processes
            _add_seconds(out, stage, time.time() - start, restart=fresh)
        report[stage] = {**result, "seconds": time.time() - start}
        print(f"{stage}: {result['steps']} steps in {report[stage]['seconds']:.0f} s", flush=True)
    return report


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m causal_dit_jax.train.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a RecipeConfig JSON (recipes/embedded_default.json)")
    p.add_argument("--out", required=True, help="the run folder (resumed when it holds this recipe's run)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    p.add_argument("--budget", type=float, default=None, help="seconds for this process; a stage at the limit checkpoints")
    p.add_argument("--finish-early", action="store_true", help="at the budget, end the stage from its EMA weights so far")
    p.add_argument("--extend", default="", help="decoder, teacher or student (comma-separated): another round from its result")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    config = RecipeConfig.from_file(args.config)
    try:
        stages = tuple(s for s in args.stages.split(",") if s)
        extend = tuple(s for s in args.extend.split(",") if s)
        report = run_recipe(config, args.out, stages, args.budget, args.finish_early, not args.quiet, extend)
    except StageStopped as e:
        print(e, flush=True)
        return 3
    print(json.dumps(report), flush=True)
    totals = stage_seconds(args.out)
    print(f"stage seconds so far: {json.dumps(totals)}, {sum(totals.values()):.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "STAGES",
    "RecipeConfig",
    "StageConfig",
    "StageStopped",
    "export",
    "run_recipe",
    "stage_seconds",
    "teacher_generate",
    "train_decoder",
    "train_decoder_long",
    "train_dmd",
    "train_student",
    "train_teacher",
    "train_vae",
]
