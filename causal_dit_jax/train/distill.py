"""Few-step distillation by ODE regression (Self-Forcing's ODE initialisation of the causal generator).

A teacher (a bidirectional Wan-style model, `bidirectional_plan`, or a causal one, `block_causal_plan`)
integrates the flow ODE from noise to a clean video with many Euler steps (`ode_trajectory`),
recording the states at the few-step schedule's noise levels (the sampler's [1000, 937.5, 833.3,
625]). The causal student then learns to map each recorded state straight to the trajectory's end:
every block of 3 frames draws its own step k, the student sees the blocks' states block-causally at
their timesteps, and x0 = x_k - sigma_k v is regressed onto the clean end (`OdeRegression`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.model.config import InferenceConfig
from causal_dit_jax.model.dit import CausalWanDiT, Params
from causal_dit_jax.model.scheduler import denoising_timesteps, sigma_for_timestep
from causal_dit_jax.train.block_attention import BlockAttentionPlan, block_causal_plan
from causal_dit_jax.train.objectives import sequence_forward


def record_sigmas(inference: InferenceConfig = InferenceConfig()) -> np.ndarray:
    """The few-step schedule's noise levels (float32 [S]), where trajectories are recorded."""
    t = denoising_timesteps(
        inference.denoising_steps, inference.timestep_shift, inference.num_train_timesteps, inference.warp_denoising_step
    )
    return sigma_for_timestep(t, inference.timestep_shift, inference.num_train_timesteps)


def ode_sigma_grid(record: np.ndarray, steps_per_segment: int) -> np.ndarray:
    """Euler grid from record[0] down to 0 that passes through every recorded sigma: each segment
    between consecutive levels (and the last one to 0) split into `steps_per_segment` equal steps."""
    if steps_per_segment < 1:
        raise ValueError(f"steps_per_segment must be >= 1, got {steps_per_segment}")
    levels = np.concatenate([np.asarray(record, np.float64), [0.0]])
    if np.any(np.diff(levels) >= 0):
        raise ValueError(f"recorded sigmas must decrease to 0, got {record}")
    parts = [np.linspace(a, b, steps_per_segment + 1)[:-1] for a, b in zip(levels[:-1], levels[1:])]
    return np.concatenate([*parts, [0.0]]).astype(np.float32)


def ode_trajectory(
    teacher: CausalWanDiT,
    params: Params,
    noise: jax.Array,
    context: jax.Array,
    plan: BlockAttentionPlan | None = None,
    steps_per_segment: int = 12,
    record: np.ndarray | None = None,
    guidance_scale: float = 1.0,
    negative_context: jax.Array | None = None,
    num_train_timesteps: int = 1000,
) -> jax.Array:
    """The teacher's Euler flow ODE from noise [B, F, H, W, C] (at record[0], sigma 1 for the default
    schedule) to a clean video: [B, S + 1, F, H, W, C] float32, the states at the S recorded sigmas
    and the end. plan: the teacher's attention (default: the whole clip as one block, as Wan's base
    model). Classifier-free guidance with `negative_context` when guidance_scale != 1: v = v_neg + g
    (v - v_neg). Each Euler step: x <- x + (sigma_next - sigma) v(x, T = sigma * 1000)."""
    from causal_dit_jax.train.block_attention import bidirectional_plan

    record = record_sigmas() if record is None else np.asarray(record, np.float32)
    b, f = noise.shape[:2]
    plan = bidirectional_plan(f) if plan is None else plan
    if guidance_scale != 1.0 and negative_context is None:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs a negative_context")
    grid = ode_sigma_grid(record, steps_per_segment)
    time = np.arange(f)

    def velocity(x, sigma):
        t = jnp.full((b, f), sigma * num_train_timesteps, jnp.float32)
        v = sequence_forward(teacher, params, x, t, context, plan, time)
        if guidance_scale != 1.0:
            v_neg = sequence_forward(teacher, params, x, t, negative_context, plan, time)
            v = v_neg + guidance_scale * (v - v_neg)
        return v

    def step(x, sigmas):
        s, s_next = sigmas[0], sigmas[1]
        return x + (s_next - s) * velocity(x, s), x

    pairs = jnp.stack([jnp.asarray(grid[:-1]), jnp.asarray(grid[1:])], axis=1)  # steps 2
    end, states = jax.lax.scan(step, noise.astype(jnp.float32), pairs)  # states: the x before each step
    recorded = states[::steps_per_segment]  # the grid's record points: every segment's start
    return jnp.concatenate([jnp.moveaxis(recorded, 0, 1), end[:, None]], axis=1)


class OdeRegression:
    """The student's loss on teacher trajectories: batch {'trajectory': [B, S + 1, F, H, W, C] (as
    `ode_trajectory` returns), 'text': [B, K, text_dim]}. Each block draws a step k in [0, S); the
    student's x0 from the blocks' states (block-causal, each at its sigma_k) regresses onto the end."""

    def __init__(self, dit: CausalWanDiT, record: np.ndarray | None = None, frames_per_block: int = 3, remat: bool = False):
        self.dit, self.frames_per_block, self.remat = dit, frames_per_block, remat
        self.record = record_sigmas() if record is None else np.asarray(record, np.float32)

    def draw(self, key: jax.Array, batch: int, frames: int) -> jax.Array:
        """Per-block step indices [B, F] (equal inside a block)."""
        if frames % self.frames_per_block:
            raise ValueError(f"{frames} latent frames are not whole blocks of {self.frames_per_block}")
        k = jax.random.randint(key, (batch, frames // self.frames_per_block), 0, len(self.record))
        return jnp.repeat(k, self.frames_per_block, axis=1)

    def __call__(self, params: Params, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        traj = batch["trajectory"].astype(jnp.float32)
        b, s1, f = traj.shape[:3]
        if s1 != len(self.record) + 1:
            raise ValueError(f"trajectories hold {s1} states, the schedule records {len(self.record)} + the end")
        k = self.draw(key, b, f)
        # each frame's state at its block's step: b f h w c
        x = jnp.take_along_axis(traj, k[:, None, :, None, None, None], axis=1)[:, 0]
        sigma = jnp.asarray(self.record)[k]  # b f
        t = sigma * 1000.0
        plan = block_causal_plan(f, self.frames_per_block)
        flow = sequence_forward(self.dit, params, x, t, batch["text"], plan, np.arange(f), self.remat)
        x0 = x - sigma[:, :, None, None, None] * flow
        loss = jnp.mean((x0 - traj[:, -1]) ** 2)
        return loss, {"loss": loss, "mse": loss, "timestep": jnp.mean(t)}


__all__ = ["OdeRegression", "ode_sigma_grid", "ode_trajectory", "record_sigmas"]
