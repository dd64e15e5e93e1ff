"""Training configs: one dataclass per concern (the objective, the optimiser), the source of every switch."""

from __future__ import annotations

import dataclasses

from causal_dit_jax.model.config import ConfigFields

OBJECTIVES = ("teacher_forcing", "diffusion_forcing")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig(ConfigFields):
    """The flow-matching loss on the causal DiT, in blocks of `frames_per_block` latent frames.

    kind: 'teacher_forcing' (Self-Forcing's: [clean | noisy] sequence, noisy half scored) or
    'diffusion_forcing' (the noisy sequence alone, block-causal). Timesteps are drawn per block,
    uniformly over the training-table indices [min_timestep, max_timestep) of the shifted schedule
    (Self-Forcing's 0.02 / 0.98 of 1000); `bell_weight` weights each frame's MSE by Self-Forcing's
    bell-shaped timestep weight. clean_timestep: the timestep the clean copy is embedded at (0).
    """

    kind: str = "teacher_forcing"
    frames_per_block: int = 3
    min_timestep: int = 20
    max_timestep: int = 980
    shift: float = 5.0
    num_train_timesteps: int = 1000
    bell_weight: bool = True
    clean_timestep: float = 0.0

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


__all__ = ["OBJECTIVES", "SCHEDULES", "ObjectiveConfig", "OptimizerConfig"]
