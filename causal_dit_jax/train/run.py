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
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.model.config import ConfigFields, ModelConfig, get_preset
from causal_dit_jax.train.config import ObjectiveConfig, OptimizerConfig


@dataclasses.dataclass(frozen=True)
class RunConfig(ConfigFields):
    """One training run. data: a folder of .npz latents + text states (`train.data.LatentTextSource`);
    init: a converted DiT checkpoint folder to start from (`causal-dit convert`), or None for random
    weights of `preset` (or of `model`, a ModelConfig dict, when given); mesh: devices (0: one device),
    mesh / seq of them on the data axis and `seq` splitting each sequence's tokens; steps: optimiser
    updates in all (a resumed run continues to it). sample_prompts: at every checkpoint the EMA weights
    make one `sample_frames`-frame video per prompt into samples/, decoded with the text encoder and
    VAE of `sample_with` ('embedded': the embedded default's; or a `causal-dit convert` folder), at
    the data's size; `causal-dit train` wires this up (the library's `train` takes an `on_checkpoint`)."""

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
    save_every: int = 50
    keep: int = 3
    log_every: int = 10
    sample_prompts: tuple[str, ...] = ()
    sample_with: str | None = None
    sample_frames: int = 21
    objective: ObjectiveConfig = ObjectiveConfig()
    optimizer: OptimizerConfig = OptimizerConfig()

    def __post_init__(self):
        for name in ("batch_size", "steps", "save_every", "keep", "log_every"):
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
        for name, sub in (("objective", ObjectiveConfig), ("optimizer", OptimizerConfig)):
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
    """Every check that needs no compile: the data folder and its shapes against the model, the mesh.
    Returns (model config, the data source)."""
    from causal_dit_jax.train.data import LatentTextSource

    model = config.model_config()
    source = LatentTextSource(config.data)
    latents, text = source.shapes["latents"], source.shapes["text"]
    f, h, w, c = latents
    if c != model.in_dim or text[-1] != model.text_dim:
        raise ValueError(
            f"the data ({config.data}) holds latents [{f}, {h}, {w}, {c}] and text [.., {text[-1]}]; the model reads "
            f"{model.in_dim} latent channels and text of width {model.text_dim}"
        )
    if f % config.objective.frames_per_block:
        raise ValueError(f"{f} latent frames are not whole blocks of {config.objective.frames_per_block}")
    model.tokens_per_frame(h, w)
    if config.mesh > jax.device_count():
        raise ValueError(f"mesh={config.mesh} devices, but {jax.device_count()} are visible")
    return model, source


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

    from causal_dit_jax.model.dit import CausalWanDiT, load_dit
    from causal_dit_jax.train.checkpoints import RunCheckpoints, export_inference_checkpoint
    from causal_dit_jax.train.data import iterate, make_dataset
    from causal_dit_jax.train.objectives import FlowObjective
    from causal_dit_jax.train.trainer import Trainer, train_mesh

    model, source = check_run(config)  # before any compile
    out = pathlib.Path(config.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(config.to_dict(), indent=2)
    print(config_json, flush=True)
    saved = out / "run_config.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(config_json):  # compared as JSON (tuples: lists)
        raise ValueError(f"{out} holds a run with another config ({saved}); use a new out_dir to start another run")
    saved.write_text(config_json)

    master = model.replace(param_dtype="float32")  # float32 master weights, compute in model.dtype
    dit = CausalWanDiT(master)
    if config.init is not None:
        _, params = load_dit(config.init)
    else:
        params = dit.init(jax.random.key(config.seed))
    mesh = train_mesh(config.mesh, seq=config.seq) if config.mesh else None
    trainer = Trainer(FlowObjective(dit, config.objective, remat=config.remat, mesh=mesh), config.optimizer, mesh)
    state = trainer.init_state(params, config.seed)
    del params
    dataset = make_dataset(
        source, config.batch_size, config.seed, shard_index=jax.process_index(), shard_count=jax.process_count()
    )
    data = iterate(dataset)
    metrics_path = out / "metrics.jsonl"
    resumed_from = None
    with RunCheckpoints(out / "checkpoints", keep=config.keep, save_every=config.save_every) as ckpts:
        if ckpts.latest_step() is not None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            state, data_state, _ = ckpts.restore(abstract)
            data.set_state(data_state)
            resumed_from = int(state["step"])
            # the metrics of steps after the checkpoint are logged again by this run
            if metrics_path.exists():
                rows = [r for r in metrics_path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= resumed_from]
                metrics_path.write_text("".join(r + "\n" for r in rows))
            print(f"resumed from step {resumed_from} in {out / 'checkpoints'}", flush=True)
        step = int(state["step"])
        tokens = config.batch_size * int(np.prod(source.shapes["latents"][:3])) // (model.patch_size[1] * model.patch_size[2])
        last = {}
        bar = tqdm(total=config.steps, initial=step, unit="step", desc="training", disable=not progress)
        t_last = time.perf_counter()
        end = config.steps if stop_after is None else min(config.steps, step + stop_after)
        while step < end:
            batch = next(data)
            state, metrics = trainer.step(state, {"latents": jnp.asarray(batch["latents"]), "text": jnp.asarray(batch["text"])})
            step += 1
            if step % config.log_every == 0 or step == config.steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                dt = (now - t_last) / config.log_every
                t_last = now
                last = {"step": step, **m, "step_s": dt, "tokens_per_s": tokens / dt}
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(last) + "\n")
                bar.set_postfix(loss=f"{m['loss']:.4f}", step_s=f"{dt:.2f}", tok_s=f"{tokens / dt:.0f}")
            bar.update(1)
            if step % config.save_every == 0 or step == end:
                ckpts.save(step, state, data.get_state(), config.to_dict(), force=True)
                if metrics_path.exists():
                    save_loss_curve(metrics_path, out / "loss.png")
                if on_checkpoint is not None:
                    on_checkpoint(step, state["ema"], out)
        bar.close()
    if step < config.steps:
        print(f"stopped at step {step} of {config.steps}; run the same config again to resume", flush=True)
        return {"step": step, "loss": last.get("loss"), "resumed_from": resumed_from}
    export_inference_checkpoint(state["ema"], model, out / "export", overwrite=True)
    print(f"trained to step {step}; the EMA weights are in {out / 'export'} (load_dit)", flush=True)
    return {"step": step, "loss": last.get("loss"), "resumed_from": resumed_from}


__all__ = ["RunConfig", "check_run", "save_loss_curve", "train"]
