"""What one step of a `RunConfig` run does, per objective kind: its train state, its update, its EMA.

    FlowRun   teacher / diffusion forcing on clean latents: one `Trainer` update per batch
              {'latents' [B, F, H, W, C], 'text' [B, K, D]}.
    OdeRun    ODE regression: per batch of prompts {'text' [B, K, D]} the frozen teacher integrates
              its flow ODE from fresh noise (streamed with the KV cache for a causal teacher, the whole
              clip at once for a bidirectional one), then the student regresses onto the trajectory.
    DmdRun    Self-Forcing DMD on prompts: `DMDTrainer` (critic updates, then one generator update on
              its KV-cached rollout) with the frozen teacher as the real score.

Each draws the step's noise from (seed, step) alone, so a resumed run draws what it would have drawn.
The teacher's (and critic's) weights are read from converted checkpoint folders straight onto the
train state's shardings (`load_weights`). Across processes (jax.distributed) each passes its own
rows of the global batch; the noise and the negative prompt's rows are global arrays, the same as in
one process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from causal_dit_jax.model.config import InferenceConfig, KernelConfig, ModelConfig
from causal_dit_jax.model.dit import CausalWanDiT, Params


def _noise(seed: int, step, shape: tuple[int, ...]) -> jax.Array:
    """The generator's / ODE's starting noise of update `step` (independent of the train state's rng)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x0DE), step)
    return jax.random.normal(key, shape, jnp.float32)


def checkpoint_dit(folder, kernels: KernelConfig = KernelConfig()) -> CausalWanDiT:
    """The DiT of a converted checkpoint folder (its config.json; no weights read), run with `kernels`."""
    from causal_dit_jax.checkpoint import read_checkpoint_config

    meta = read_checkpoint_config(folder)
    if "dit" not in meta:
        raise ValueError(f"{folder}: its config.json has no 'dit' section (not a DiT checkpoint)")
    return CausalWanDiT(ModelConfig.from_dict(meta["dit"]), kernels)


def training_dit(model: ModelConfig, scan_unroll: int = 1) -> CausalWanDiT:
    """A DiT to train: float32 master weights (compute in model.dtype), `scan_unroll` layers per
    iteration of its layer loop (a run's `RunConfig.scan_unroll`, a recipe stage's)."""
    return CausalWanDiT(model.replace(param_dtype="float32"), KernelConfig(scan_unroll=scan_unroll))


def load_weights(folder, trainer) -> Params:
    """A DiT checkpoint's weights read straight onto `trainer`'s state shardings (FSDP over its mesh,
    the global mesh across processes); without a mesh, onto one device as `load_dit` does."""
    from causal_dit_jax.checkpoint import restore_component

    abstract = checkpoint_dit(folder).abstract_params()
    if trainer.mesh is not None:
        shardings = trainer.state_shardings(abstract)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return restore_component(folder, "dit", abstract)


def _rows(trainer) -> dict:
    """jit's out_shardings for arrays split like the batch (over the data axis); none without a mesh."""
    from causal_dit_jax.train.trainer import DATA_AXIS

    return {} if trainer.mesh is None else {"out_shardings": NamedSharding(trainer.mesh, PartitionSpec(DATA_AXIS))}


class _OneTrainer:
    """A run whose state is one `Trainer`'s (`self.trainer`)."""

    def init_state(self, params: Params, seed: int) -> dict:
        return self.trainer.init_state(params, seed)

    @staticmethod
    def ema(state: dict) -> Params:
        return state["ema"]

    @staticmethod
    def step_of(state: dict) -> int:
        return int(state["step"])


class FlowRun(_OneTrainer):
    """Teacher forcing or diffusion forcing (`ObjectiveConfig.kind`)."""

    def __init__(self, config, model: ModelConfig, mesh):
        from causal_dit_jax.train.objectives import FlowObjective
        from causal_dit_jax.train.trainer import Trainer

        dit = training_dit(model, config.scan_unroll)
        self.trainer = Trainer(FlowObjective(dit, config.objective, remat=config.remat, mesh=mesh), config.optimizer, mesh)

    def step(self, state: dict, batch: dict, step: int) -> tuple[dict, dict]:
        return self.trainer.step(state, {"latents": jnp.asarray(batch["latents"]), "text": jnp.asarray(batch["text"])})


class _FromTeacher:
    """The teacher (frozen, placed like the train state), the prompts' global arrays and the noise."""

    def __init__(self, config, model: ModelConfig, latent_shape: tuple[int, int, int], negative_text):
        self.config, self.model = config, model
        self.distill = config.distill
        self.latent_shape = latent_shape  # F H W
        self.teacher = checkpoint_dit(config.teacher, KernelConfig(scan_unroll=config.scan_unroll))
        self.negative_text = None if negative_text is None else np.asarray(negative_text, np.float32)  # K D
        self.inference = InferenceConfig(
            frames_per_chunk=config.objective.frames_per_block, denoising_steps=config.distill.denoising_steps
        )

    def place(self, trainer) -> None:
        """Read the teacher's weights onto `trainer`'s state shardings (FSDP), and ready the step's global
        arrays, split over the data axis as the batch: the noise and the negative prompt's rows."""
        self.batch_trainer = trainer
        self.teacher_params = load_weights(self.config.teacher, trainer)
        f, h, w = self.latent_shape
        shape = (self.config.batch_size, f, h, w, self.model.in_dim)  # the global batch's
        seed = self.config.seed
        self._draw_noise = jax.jit(lambda step: _noise(seed, step, shape), **_rows(trainer))
        self.negative = None if self.negative_text is None else self._negative_rows(trainer)

    def _negative_rows(self, trainer) -> jax.Array:
        """The negative prompt's states for every row of the global batch [B, K, D] (a global array)."""
        neg = self.negative_text
        if trainer.mesh is None:
            one = jnp.asarray(neg)
        else:  # replicated over the global mesh: every process holds the same states
            one = jax.make_array_from_callback(neg.shape, NamedSharding(trainer.mesh, PartitionSpec()), lambda i: neg[i])
        b = self.config.batch_size
        return jax.jit(lambda x: jnp.broadcast_to(x, (b, *x.shape)), **_rows(trainer))(one)

    def prompts(self, batch: dict) -> jax.Array:
        """The batch's prompts [B, K, D] as a global array (across processes each gives its own rows)."""
        trainer = self.batch_trainer
        return jnp.asarray(batch["text"]) if trainer.mesh is None else trainer.place_batch(np.asarray(batch["text"]))

    def negative_batch(self, text: jax.Array) -> jax.Array:
        """The negative prompt's states for every prompt of the batch [B, K, D] (the prompts themselves
        when there is none: then guidance must be 1, checked by `check_run`)."""
        return text if self.negative is None else self.negative

    def noise(self, step: int) -> jax.Array:
        """The global batch's noise of update `step` [B, F, H, W, C], split over the data axis."""
        return self._draw_noise(jnp.int32(step))


class OdeRun(_FromTeacher, _OneTrainer):
    """ODE regression onto the teacher's trajectories, made on the fly from each batch's prompts."""

    def __init__(self, config, model: ModelConfig, mesh, latent_shape, negative_text):
        from causal_dit_jax.train.distill import OdeRegression, causal_ode_trajectory, ode_trajectory, record_sigmas
        from causal_dit_jax.train.trainer import Trainer

        super().__init__(config, model, latent_shape, negative_text)
        causal = self.distill.teacher_attention == "causal"
        record = record_sigmas(self.inference)
        student = training_dit(model, config.scan_unroll)
        objective = OdeRegression(
            student, record, config.objective.frames_per_block, config.remat, clean_context=causal, mesh=mesh
        )
        self.trainer = Trainer(objective, config.optimizer, mesh)
        self.place(self.trainer)
        teacher, inference, g = self.teacher, self.inference, self.distill.guidance_scale
        steps = self.distill.ode_steps_per_segment

        def trajectory(teacher_params, text, negative, noise):  # -> b (s + 1) f h w c
            if causal:
                kv = teacher.encode_text(teacher_params, text)
                neg = teacher.encode_text(teacher_params, negative) if g != 1.0 else None
                return causal_ode_trajectory(teacher, teacher_params, noise, kv, inference, steps, record, g, neg)
            neg = negative if g != 1.0 else None
            return ode_trajectory(teacher, teacher_params, noise, text, None, steps, record, g, neg)

        self._trajectory = jax.jit(trajectory, **_rows(self.trainer))

    def step(self, state: dict, batch: dict, step: int) -> tuple[dict, dict]:
        text = self.prompts(batch)
        traj = self._trajectory(self.teacher_params, text, self.negative_batch(text), self.noise(step))
        return self.trainer.step(state, {"trajectory": traj, "text": text})


class DmdRun(_FromTeacher):
    """Self-Forcing DMD: the critic starts from `config.critic` (default: the teacher's weights)."""

    def __init__(self, config, model: ModelConfig, mesh, latent_shape, negative_text):
        from causal_dit_jax.train.dmd import DMD, DMDConfig, DMDTrainer

        objective, distill = config.objective, config.distill
        super().__init__(config, model, latent_shape, negative_text)
        critic_dit = checkpoint_dit(config.critic) if config.critic else self.teacher
        dmd = DMD(
            training_dit(model, config.scan_unroll),
            self.teacher,
            training_dit(critic_dit.config, config.scan_unroll),
            DMDConfig(
                distill.guidance_scale,
                objective.min_timestep,
                objective.max_timestep,
                objective.shift,
                score_attention=distill.teacher_attention,
            ),
            self.inference,
            mesh=mesh,  # with a 'seq' axis the rollout's and the scores' tokens split over it
        )
        self.dmd_trainer = DMDTrainer(dmd, config.optimizer, distill.critic_optimizer, distill.critic_steps, mesh)
        self.place(self.dmd_trainer.generator)
        self.critic_init = load_weights(config.critic, self.dmd_trainer.critic) if config.critic else None

    def init_state(self, params: Params, seed: int) -> dict:
        critic = self.critic_init if self.critic_init is not None else self.teacher_params
        return self.dmd_trainer.init_state(params, critic, seed)

    def step(self, state: dict, batch: dict, step: int) -> tuple[dict, dict]:
        text = self.prompts(batch)
        dmd_batch = {"text": text, "negative_text": self.negative_batch(text), "noise": self.noise(step)}
        return self.dmd_trainer.step(state, self.teacher_params, dmd_batch, self.config.seed)

    @staticmethod
    def ema(state: dict) -> Params:
        return state["generator"]["ema"]

    @staticmethod
    def step_of(state: dict) -> int:
        """Generator updates so far."""
        return int(state["generator"]["step"])


def make_run_objective(config, model: ModelConfig, mesh, latent_shape, negative_text=None):
    """The FlowRun / OdeRun / DmdRun of `config.objective.kind`."""
    kind = config.objective.kind
    if kind in ("teacher_forcing", "diffusion_forcing"):
        return FlowRun(config, model, mesh)
    if kind == "ode_regression":
        return OdeRun(config, model, mesh, latent_shape, negative_text)
    if kind == "dmd":
        return DmdRun(config, model, mesh, latent_shape, negative_text)
    raise ValueError(f"no run for objective {kind!r}")


def tokens_per_step(config, model: ModelConfig, latent_shape) -> int:
    """Patch tokens the DiT being trained reads per update (batch x frames x patches)."""
    f, h, w = latent_shape
    return config.batch_size * int(np.prod((f, h, w))) // (model.patch_size[1] * model.patch_size[2])


__all__ = [
    "DmdRun",
    "FlowRun",
    "OdeRun",
    "checkpoint_dit",
    "load_weights",
    "make_run_objective",
    "tokens_per_step",
    "training_dit",
]
