"""A training run from one config file: data, model, objective, optimiser, checkpoints, logs, export.

`causal-dit train --config run.json` runs `train(RunConfig.from_file("run.json"))`. The run folder holds
run_config.json (the config, printed at the start too), checkpoints/ (Orbax, the last `keep` steps:
params, EMA, optimiser state, RNG, step, the data position), metrics.jsonl (a line per logged step),
loss.png (the loss curve, redrawn at every checkpoint), and at the end export/ (the EMA weights as an
inference checkpoint, `load_dit("run/export")`). A run whose folder already holds checkpoints resumes
from the latest one exactly: the same batches, draws and losses as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax

from causal_dit_jax.model.config import ConfigFields, ModelConfig, get_preset
from causal_dit_jax.train.config import DISTILL_OBJECTIVES, DistillConfig, ObjectiveConfig, OptimizerConfig


@dataclasses.dataclass(frozen=True)
class RunConfig(ConfigFields):
    """One training run. data: a folder of .npz latents + text states (`train.data.LatentTextSource`;
    for the distillations, 'ode_regression' and 'dmd', text states alone suffice: `TextStateSource`,
    with the negative prompt's states in negative_text.npy, as `causal-dit prepare-data` writes them);
    init: a converted DiT checkpoint folder to start from (`causal-dit convert`), or None for random
    weights of `preset` (or of `model`, a ModelConfig dict, when given); teacher: the frozen teacher's
    checkpoint folder for the distillations (`distill` says how it attends and guides), critic: DMD's
    critic's starting weights (default the teacher's); mesh: devices (0: one device),
    mesh / seq of them on the data axis and `seq` splitting each sequence's tokens; steps: optimiser
    updates in all (a resumed run continues to it). sample_prompts: at every checkpoint the EMA weights
    make one `sample_frames`-frame video per prompt into samples/, decoded with the text encoder and
    VAE of `sample_with` ('embedded': the embedded default's; or a `causal-dit convert` folder), at
    the data's size; `causal-dit train` wires this up (the library's `train` takes an `on_checkpoint`).
    remat: recompute each block in the backward pass; scan_unroll: layers per iteration of the DiT's
    layer loop, for every DiT of the run (`KernelConfig.scan_unroll`: num_layers unrolls it, which
    speeds a small model's steps and drops the scan's stacked residuals, at a larger program)."""

    out_dir: str
    data: str
    init: str | None = None
    preset: str = "tiny"
    model: dict | None = None
    batch_size: int = 2
    steps: int = 100
    seed: int = 0
    mesh: int = 0
    seq: int = 1
    remat: bool = False
    scan_unroll: int = 1
    save_every: int = 50
    keep: int = 3
    log_every: int = 10
    sample_prompts: tuple[str, ...] = ()
    sample_with: str | None = None
    sample_frames: int = 21
    objective: ObjectiveConfig = ObjectiveConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    teacher: str | None = None
    critic: str | None = None
    distill: DistillConfig = DistillConfig()

    def __post_init__(self):
        for name in ("batch_size", "steps", "save_every", "keep", "log_every", "scan_unroll"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mesh < 0:
            raise ValueError(f"mesh must be a device count (0: one device), got {self.mesh}")
        if self.batch_size % self.optimizer.accumulate:
            raise ValueError(f"batch_size {self.batch_size} does not split into accumulate={self.optimizer.accumulate}")
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        if self.sample_prompts and self.sample_with is None:
            raise ValueError("sample_prompts need sample_with: 'embedded' or a converted checkpoint folder (its umT5 and VAE)")
        if self.seq < 1 or (self.seq > 1 and (not self.mesh or self.mesh % self.seq)):
            raise ValueError(f"seq={self.seq} must divide the mesh's {self.mesh} devices (seq > 1 needs a mesh)")
        distilling = self.objective.kind in DISTILL_OBJECTIVES
        if distilling and self.teacher is None:
            raise ValueError(
                f"objective {self.objective.kind!r} distils a teacher: set 'teacher' (a converted checkpoint folder)"
            )
        if not distilling and (self.teacher is not None or self.critic is not None):
            raise ValueError(f"'teacher' and 'critic' are read only by {list(DISTILL_OBJECTIVES)}, not {self.objective.kind!r}")
        if self.critic is not None and self.objective.kind != "dmd":
            raise ValueError("'critic' is DMD's critic (objective 'dmd')")
        data = self.mesh // self.seq if self.mesh else 1
        if (self.batch_size // self.optimizer.accumulate) % data:
            raise ValueError(
                f"each micro-batch ({self.batch_size // self.optimizer.accumulate}) must split over the data "
                f"axis's {data} devices"
            )

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown RunConfig fields: {sorted(unknown)}")
        for name, sub in (("objective", ObjectiveConfig), ("optimizer", OptimizerConfig), ("distill", DistillConfig)):
            if isinstance(d.get(name), dict):
                d[name] = sub.from_dict(d[name])
        if "out_dir" not in d or "data" not in d:
            raise ValueError("a run config needs 'out_dir' (the run folder) and 'data' (the latents folder)")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> RunConfig:
        p = pathlib.Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"run config {p} does not exist")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"run config {p} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def model_config(self) -> ModelConfig:
        """The DiT's shapes: the init checkpoint's, `model`, or the preset's."""
        if self.init is not None:
            from causal_dit_jax.checkpoint import read_checkpoint_config

            return ModelConfig.from_dict(read_checkpoint_config(self.init)["dit"])
        return ModelConfig.from_dict(self.model) if self.model else get_preset(self.preset)


def check_run(config: RunConfig):
    """Every check that needs no compile: the data folder and its shapes against the model (and the
    teacher's), the mesh. Returns (model config, the data source, the latent shape [F, H, W])."""
    from causal_dit_jax.train.data import LatentTextSource, TextStateSource

    model = config.model_config()
    if config.objective.kind in DISTILL_OBJECTIVES:
        source = TextStateSource(config.data)
        shape = config.distill.latent_shape or source.latent_shape
        if shape is None:
            raise ValueError(
                f"the data ({config.data}) holds text states alone: give the video's latent shape as distill's "
                "latent_frames, latent_height and latent_width"
            )
        _check_teacher(config, model)
        if config.distill.guidance_scale != 1.0 and source.negative_text is None:
            raise ValueError(
                f"guidance_scale={config.distill.guidance_scale} needs the negative prompt's states: "
                f"{config.data}/negative_text.npy (`causal-dit prepare-data` writes it)"
            )
    else:
        source = LatentTextSource(config.data)
        shape = source.shapes["latents"][:3]
        c = source.shapes["latents"][3]
        if c != model.in_dim:
            raise ValueError(f"the data ({config.data}) holds latents of {c} channels; the model reads {model.in_dim}")
    f, h, w = shape
    text = source.shapes["text"]
    if text[-1] != model.text_dim:
        raise ValueError(
            f"the data ({config.data}) holds text of width {text[-1]}; the model reads text of width {model.text_dim}"
        )
    if f % config.objective.frames_per_block:
        raise ValueError(f"{f} latent frames are not whole blocks of {config.objective.frames_per_block}")
    model.tokens_per_frame(h, w)
    if config.mesh > jax.device_count():
        raise ValueError(f"mesh={config.mesh} devices, but {jax.device_count()} are visible")
    hosts = jax.process_count()
    if config.batch_size % hosts or (hosts > 1 and config.mesh != jax.device_count()):
        raise ValueError(
            f"across {hosts} processes the batch ({config.batch_size}, global) must split into one part per process "
            f"and the mesh span all {jax.device_count()} devices (mesh={config.mesh})"
        )
    return model, source, (int(f), int(h), int(w))


def _check_teacher(config: RunConfig, model: ModelConfig) -> None:
    """The teacher's (and critic's) checkpoint exists and reads the student's latents and text."""
    from causal_dit_jax.checkpoint import read_checkpoint_config

    for role in ("teacher", "critic"):
        folder = getattr(config, role)
        if folder is None:
            continue
        meta = read_checkpoint_config(folder)
        if "dit" not in meta:
            raise ValueError(f"{role} {folder}: its config.json has no 'dit' section (not a DiT checkpoint)")
        other = ModelConfig.from_dict(meta["dit"])
        if (other.in_dim, other.text_dim, other.patch_size) != (model.in_dim, model.text_dim, model.patch_size):
            raise ValueError(
                f"the {role} ({folder}) reads latents of {other.in_dim} channels, text of width {other.text_dim} and "
                f"patches {other.patch_size}; the model being trained {model.in_dim}, {model.text_dim}, {model.patch_size}"
            )


def host_data_state(data_state: dict) -> dict:
    """A saved data position for this host: Orbax writes JSON items from process 0, and every host
    takes the same number of batches, so process 0's state with this host's shard index is its own."""
    if jax.process_count() == 1 or "pipeline" not in data_state:
        return data_state
    return {**data_state, "pipeline": {**data_state["pipeline"], "shard_index": jax.process_index()}}


def host_copy(params):
    """The params as host arrays on every process (gathered across hosts when there are several)."""
    if jax.process_count() == 1:
        return params
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def save_loss_curve(metrics_path: pathlib.Path, png: pathlib.Path) -> None:
    """Draw metrics.jsonl's loss against step into a PNG (written whole, then moved into place)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)


def train(config: RunConfig, progress: bool = True, stop_after: int | None = None, on_checkpoint=None) -> dict:
    """Run (or resume) the training run; returns {'step', 'loss' (the last logged), 'resumed_from'}.

    on_checkpoint(step, ema_params, out_dir): called after each checkpoint (e.g. to write samples).

    stop_after: end this process after that many steps with a checkpoint (a job with a time limit,
    resumed by running the same config again); the export is written only when the run is complete."""
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 steps, got {stop_after}")
    from tqdm import tqdm

    from causal_dit_jax.model.dit import CausalWanDiT
    from causal_dit_jax.train.checkpoints import RunCheckpoints, export_inference_checkpoint
    from causal_dit_jax.train.data import iterate, make_dataset
    from causal_dit_jax.train.run_objectives import load_weights, make_run_objective, tokens_per_step
    from causal_dit_jax.train.trainer import train_mesh

    model, source, latent_shape = check_run(config)  # before any compile
    hosts, main = jax.process_count(), jax.process_index() == 0  # several: jax.distributed.initialize ran
    out = pathlib.Path(config.out_dir).expanduser()
    config_json = json.dumps(config.to_dict(), indent=2)
    saved = out / "run_config.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(config_json):  # compared as JSON (tuples: lists)
        raise ValueError(f"{out} holds a run with another config ({saved}); use a new out_dir to start another run")
    if main:  # the run folder's files are process 0's; the checkpoints are written by every process
        print(config_json, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(config_json)

    mesh = train_mesh(config.mesh, seq=config.seq) if config.mesh else None
    run = make_run_objective(config, model, mesh, latent_shape, getattr(source, "negative_text", None))
    if config.init is not None:  # read onto the train state's shardings (the global mesh across processes)
        params = load_weights(config.init, getattr(run, "trainer", None) or run.dmd_trainer.generator)
    else:
        params = CausalWanDiT(model.replace(param_dtype="float32")).init(jax.random.key(config.seed))
    state = run.init_state(params, config.seed)
    del params
    # each host reads its shard: batch_size / hosts rows of the global batch
    dataset = make_dataset(source, config.batch_size // hosts, config.seed, shard_index=jax.process_index(), shard_count=hosts)
    data = iterate(dataset)
    metrics_path = out / "metrics.jsonl"
    resumed_from = None
    with RunCheckpoints(out / "checkpoints", keep=config.keep, save_every=config.save_every) as ckpts:
        if ckpts.latest_step() is not None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            state, data_state, _ = ckpts.restore(abstract)
            data.set_state(host_data_state(data_state))
            resumed_from = run.step_of(state)
            # the metrics of steps after the checkpoint are logged again by this run
            if main and metrics_path.exists():
                rows = [r for r in metrics_path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= resumed_from]
                metrics_path.write_text("".join(r + "\n" for r in rows))
            if main:
                print(f"resumed from step {resumed_from} in {out / 'checkpoints'}", flush=True)
        step = run.step_of(state)
        tokens = tokens_per_step(config, model, latent_shape)
        last = {}
        bar = tqdm(total=config.steps, initial=step, unit="step", desc="training", disable=not (progress and main))
        t_last = time.perf_counter()
        end = config.steps if stop_after is None else min(config.steps, step + stop_after)
        while step < end:
            state, metrics = run.step(state, next(data), step)
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                dt = (now - t_last) / config.log_every
                t_last = now
                last = {"step": step, **m, "step_s": dt, "tokens_per_s": tokens / dt}
                if main:
                    with metrics_path.open("a") as fh:
                        fh.write(json.dumps(last) + "\n")
                bar.set_postfix(loss=f"{m['loss']:.4f}", step_s=f"{dt:.2f}", tok_s=f"{tokens / dt:.0f}")
            bar.update(1)
            if step % config.save_every == 0 or step == end:
                # the data position of every host is process 0's with its own shard (they step together)
                ckpts.save(step, state, data.get_state(), config.to_dict(), force=True)
                if main and metrics_path.exists():
                    save_loss_curve(metrics_path, out / "loss.png")
                if on_checkpoint is not None:
                    ema = host_copy(run.ema(state))  # every process takes part in the gather
                    if main:
                        on_checkpoint(step, ema, out)
        bar.close()
    if step < config.steps:
        if main:
            print(f"stopped at step {step} of {config.steps}; run the same config again to resume", flush=True)
        return {"step": step, "loss": last.get("loss"), "resumed_from": resumed_from}
    ema = host_copy(run.ema(state))
    if main:
        export_inference_checkpoint(ema, model, out / "export", overwrite=True)
        print(f"trained to step {step}; the EMA weights are in {out / 'export'} (load_dit)", flush=True)
    return {"step": step, "loss": last.get("loss"), "resumed_from": resumed_from}


__all__ = ["RunConfig", "check_run", "save_loss_curve", "train"]
