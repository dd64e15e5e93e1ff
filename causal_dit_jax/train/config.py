"""Training configs: one dataclass per concern (the objective, the optimiser), the source of every switch."""

from __future__ import annotations

import dataclasses

from causal_dit_jax.model.config import ConfigFields

OBJECTIVES = ("teacher_forcing", "diffusion_forcing", "ode_regression", "dmd")
FLOW_OBJECTIVES = ("teacher_forcing", "diffusion_forcing")  # trained on clean latents
DISTILL_OBJECTIVES = ("ode_regression", "dmd")  # trained from a teacher on prompts alone
TEACHER_ATTENTION = ("causal", "bidirectional")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig(ConfigFields):
    """The loss on the causal DiT, in blocks of `frames_per_block` latent frames.

    kind: 'teacher_forcing' (Self-Forcing's: [clean | noisy] sequence, noisy half scored),
    'diffusion_forcing' (the noisy sequence alone, block-causal), or one of the few-step
    distillations from a teacher, set by `DistillConfig`: 'ode_regression' (onto the teacher's ODE
    trajectories) or 'dmd' (Self-Forcing's distribution matching on the generator's rollouts). Timesteps are drawn per block,
    uniformly over the training-table indices [min_timestep, max_timestep) of the shifted schedule
    (Self-Forcing's 0.02 / 0.98 of 1000); `bell_weight` weights each frame's MSE by Self-Forcing's
    bell-shaped timestep weight. clean_timestep: the timestep the clean copy is embedded at (0).
    local_attn_size / sink_size: train under the rolling KV cache's view (latent frames, as
    `InferenceConfig`'s): each block attends only the first sink_size frames and the latest
    local_attn_size - sink_size up to its end, what the rolling cache holds at inference; -1 / 0 (the
    default): every earlier frame. On clips longer than the window this trains the view that
    inference reaches past the trained length.
    """

    kind: str = "teacher_forcing"
    frames_per_block: int = 3
    min_timestep: int = 20
    max_timestep: int = 980
    shift: float = 5.0
    num_train_timesteps: int = 1000
    bell_weight: bool = True
    clean_timestep: float = 0.0
    local_attn_size: int = -1
    sink_size: int = 0

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.kind!r}; expected one of {list(OBJECTIVES)}")
        if not 0 <= self.min_timestep < self.max_timestep <= self.num_train_timesteps:
            raise ValueError(
                f"need 0 <= min_timestep < max_timestep <= {self.num_train_timesteps}, got {self.min_timestep}, "
                f"{self.max_timestep}"
            )
        if self.frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {self.frames_per_block}")
        from causal_dit_jax.train.block_attention import check_window

        check_window(self.frames_per_block, self.local_attn_size, self.sink_size)
        if self.local_attn_size != -1 and self.kind not in FLOW_OBJECTIVES:
            raise ValueError(f"local_attn_size / sink_size train teacher or diffusion forcing, not {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(ConfigFields):
    """optax AdamW with a linear warmup then a cosine decay (to `final_lr_ratio` of the peak) or a
    constant rate; global-norm clipping; `accumulate` micro-batches per update (the batch is split);
    an EMA of the weights from `ema_start` on (Self-Forcing releases its generator's EMA, decay 0.99)."""

    learning_rate: float = 2e-6
    warmup_steps: int = 0
    schedule: str = "constant"
    total_steps: int = 1000
    final_lr_ratio: float = 0.0
    b1: float = 0.0
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float = 10.0
    accumulate: int = 1
    ema_decay: float = 0.99
    ema_start: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {list(SCHEDULES)}")
        if self.learning_rate <= 0 or self.accumulate < 1 or self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"need learning_rate > 0, accumulate >= 1, total_steps >= 1, warmup_steps >= 0; got {self.learning_rate}, "
                f"{self.accumulate}, {self.total_steps}, {self.warmup_steps}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclasses.dataclass(frozen=True)
class DistillConfig(ConfigFields):
    """Few-step distillation from a teacher (`ObjectiveConfig.kind` 'ode_regression' or 'dmd').

    teacher_attention: how the teacher checkpoint attends: 'causal' (a causal DiT such as this
    project's teacher-forcing runs: its ODE streams chunk by chunk with the KV cache, its DMD scores
    read each chunk after the clean generated chunks before it) or 'bidirectional' (Wan's base
    model: the whole clip as one block).
    guidance_scale: the teacher's classifier-free guidance (the data folder's negative_text.npy is the
    negative prompt). latent_frames / latent_height / latent_width: the generated video's latent shape
    (default: the data's latents, when its records hold them).
    denoising_steps: the student's few-step schedule (`InferenceConfig.denoising_steps`; Self-Forcing's 4).
    ode_steps_per_segment: Euler steps of the teacher between the schedule's noise levels.
    critic_steps: DMD critic updates per generator update (Self-Forcing: 5); critic_optimizer: its AdamW.
    """

    teacher_attention: str = "causal"
    guidance_scale: float = 3.0
    latent_frames: int | None = None
    latent_height: int | None = None
    latent_width: int | None = None
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    ode_steps_per_segment: int = 12
    critic_steps: int = 5
    critic_optimizer: OptimizerConfig = OptimizerConfig()

    def __post_init__(self):
        if self.teacher_attention not in TEACHER_ATTENTION:
            raise ValueError(f"unknown teacher_attention {self.teacher_attention!r}; expected one of {list(TEACHER_ATTENTION)}")
        if self.guidance_scale <= 0:
            raise ValueError(f"guidance_scale must be > 0 (1: no guidance), got {self.guidance_scale}")
        if self.ode_steps_per_segment < 1 or self.critic_steps < 1:
            raise ValueError(
                f"ode_steps_per_segment and critic_steps must be >= 1, got {self.ode_steps_per_segment}, {self.critic_steps}"
            )
        shape = (self.latent_frames, self.latent_height, self.latent_width)
        if any(v is not None for v in shape) and not all(isinstance(v, int) and v >= 1 for v in shape):
            raise ValueError(f"latent_frames, latent_height and latent_width go together, each >= 1; got {shape}")

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        d = dict(d)
        if isinstance(d.get("critic_optimizer"), dict):
            d["critic_optimizer"] = OptimizerConfig.from_dict(d["critic_optimizer"])
        if "denoising_steps" in d:
            d["denoising_steps"] = tuple(d["denoising_steps"])
        return super().from_dict(d)

    @property
    def latent_shape(self) -> tuple[int, int, int] | None:
        """[F, H, W] of the generated latents, or None (take the data's)."""
        return None if self.latent_frames is None else (self.latent_frames, self.latent_height, self.latent_width)


__all__ = [
    "DISTILL_OBJECTIVES",
    "FLOW_OBJECTIVES",
    "OBJECTIVES",
    "SCHEDULES",
    "DistillConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
]
