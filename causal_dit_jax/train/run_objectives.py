"""What one step of a `RunConfig` run does, per objective kind: its train state, its update, its EMA.

    FlowRun   teacher / diffusion forcing on clean latents: one `Trainer` update per batch
              {'latents' [B, F, H, W, C], 'text' [B, K, D]}.
    OdeRun    ODE regression: per batch of prompts {'text' [B, K, D]} the frozen teacher integrates
              its flow ODE from fresh noise (streamed with the KV cache for a causal teacher, the whole
              clip at once for a bidirectional one), then the student regresses onto the trajectory.
    DmdRun    Self-Forcing DMD on prompts: `DMDTrainer` (critic updates, then one generator update on
              its KV-cached rollout) with the frozen teacher as the real score.

Each draws the step's noise from (seed, step) alone, so a resumed run draws what it would have drawn.
The teacher's (and critic's) weights are read from converted checkpoint folders (`load_dit`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.model.config import InferenceConfig, ModelConfig
from causal_dit_jax.model.dit import CausalWanDiT, Params, load_dit


def _noise(seed: int, step: int, shape: tuple[int, ...]) -> jax.Array:
    """The generator's / ODE's starting noise of update `step` (independent of the train state's rng)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x0DE), step)
    return jax.random.normal(key, shape, jnp.float32)


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

        dit = CausalWanDiT(model.replace(param_dtype="float32"))  # float32 master weights, compute in model.dtype
        self.trainer = Trainer(FlowObjective(dit, config.objective, remat=config.remat, mesh=mesh), config.optimizer, mesh)

    def step(self, state: dict, batch: dict, step: int) -> tuple[dict, dict]:
        return self.trainer.step(state, {"latents": jnp.asarray(batch["latents"]), "text": jnp.asarray(batch["text"])})


class _FromTeacher:
    """The teacher (frozen, placed like the train state) and the prompts' negative text."""

    def __init__(self, config, model: ModelConfig, latent_shape: tuple[int, int, int], negative_text):
        self.config, self.model = config, model
        self.distill = config.distill
        self.latent_shape = latent_shape  # F H W
        self.teacher, self.teacher_params = load_dit(config.teacher)
        self.negative = None if negative_text is None else jnp.asarray(negative_text, jnp.float32)
        self.inference = InferenceConfig(
            frames_per_chunk=config.objective.frames_per_block, denoising_steps=config.distill.denoising_steps
        )

    def negative_batch(self, text: jax.Array) -> jax.Array:
        """The negative prompt's states for every prompt of the batch [B, K, D] (the prompts themselves
        when there is none: then guidance must be 1, checked by `check_run`)."""
        if self.negative is None:
            return text
        return jnp.broadcast_to(self.negative, text.shape)

    def noise(self, step: int, batch: int) -> jax.Array:
        f, h, w = self.latent_shape
        return _noise(self.config.seed, step, (batch, f, h, w, self.model.in_dim))

    def place_teacher(self, trainer) -> None:
        """Shard the teacher's weights over the mesh as the train state's are (FSDP)."""
        if trainer.mesh is not None:
            self.teacher_params = jax.device_put(self.teacher_params, trainer.state_shardings(self.teacher_params))


class OdeRun(_FromTeacher, _OneTrainer):
    """ODE regression onto the teacher's trajectories, made on the fly from each batch's prompts."""

    def __init__(self, config, model: ModelConfig, mesh, latent_shape, negative_text):
        from causal_dit_jax.train.distill import OdeRegression, causal_ode_trajectory, ode_trajectory, record_sigmas
        from causal_dit_jax.train.trainer import Trainer

        super().__init__(config, model, latent_shape, negative_text)
        causal = self.distill.teacher_attention == "causal"
        record = record_sigmas(self.inference)
        student = CausalWanDiT(model.replace(param_dtype="float32"))  # float32 master weights
        objective = OdeRegression(
            student, record, config.objective.frames_per_block, config.remat, clean_context=causal, mesh=mesh
        )
        self.trainer = Trainer(objective, config.optimizer, mesh)
        self.place_teacher(self.trainer)
        teacher, inference, g = self.teacher, self.inference, self.distill.guidance_scale
        steps = self.distill.ode_steps_per_segment

        def trajectory(teacher_params, text, negative, noise):  # -> b (s + 1) f h w c
            if causal:
                kv = teacher.encode_text(teacher_params, text)
                neg = teacher.encode_text(teacher_params, negative) if g != 1.0 else None
                return causal_ode_trajectory(teacher, teacher_params, noise, kv, inference, steps, record, g, neg)
            neg = negative if g != 1.0 else None
            return ode_trajectory(teacher, teacher_params, noise, text, None, steps, record, g, neg)

        self._trajectory = jax.jit(trajectory)

    def step(self, state: dict, batch: dict, step: int) -> tuple[dict, dict]:
        text = jnp.asarray(batch["text"])
        if self.trainer.mesh is not None:
            text = self.trainer.place_batch(text)
        noise = self.noise(step, text.shape[0])
        traj = self._trajectory(self.teacher_params, text, self.negative_batch(text), noise)
        return self.trainer.step(state, {"trajectory": traj, "text": text})


class DmdRun(_FromTeacher):
    """Self-Forcing DMD: the critic starts from `config.critic` (default: the teacher's weights)."""

    def __init__(self, config, model: ModelConfig, mesh, latent_shape, negative_text):
        from causal_dit_jax.train.dmd import DMD, DMDConfig, DMDTrainer

        objective, distill = config.objective, config.distill
        super().__init__(config, model, latent_shape, negative_text)
        critic_dit, critic_params = load_dit(config.critic) if config.critic else (self.teacher, None)
        self.critic_init = critic_params
        dmd = DMD(
            CausalWanDiT(model.replace(param_dtype="float32")),
            self.teacher,
            CausalWanDiT(critic_dit.config.replace(param_dtype="float32")),
            DMDConfig(
                distill.guidance_scale,
                objective.min_timestep,
                objective.max_timestep,
                objective.shift,
                score_attention=distill.teacher_attention,
            ),
            self.inference,
        )
        self.dmd_trainer = DMDTrainer(dmd, config.optimizer, distill.critic_optimizer, distill.critic_steps, mesh)
        self.place_teacher(self.dmd_trainer.generator)

    def init_state(self, params: Params, seed: int) -> dict:
        critic = self.critic_init if self.critic_init is not None else self.teacher_params
        return self.dmd_trainer.init_state(params, critic, seed)

    def step(self, state: dict, batch: dict, step: int) -> tuple[dict, dict]:
        text = jnp.asarray(batch["text"])
        b = text.shape[0]
        dmd_batch = {"text": text, "negative_text": self.negative_batch(text), "noise": self.noise(step, b)}
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


__all__ = ["DmdRun", "FlowRun", "OdeRun", "make_run_objective", "tokens_per_step"]
