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
from causal_dit_jax.model.kv_cache import TextKV
from causal_dit_jax.model.scheduler import denoising_timesteps, sigma_for_timestep
from causal_dit_jax.train.block_attention import BlockAttentionPlan, block_causal_plan, teacher_forcing_plan
from causal_dit_jax.train.objectives import sequence_forward


def record_sigmas(inference: InferenceConfig = InferenceConfig()) -> np.ndarray:
    """The few-step schedule's noise levels (float32 [S]), where trajectories are recorded."""
    t = denoising_timesteps(
        inference.denoising_steps, inference.timestep_shift, inference.num_train_timesteps, inference.warp_denoising_step
    )
    return sigma_for_timestep(t, inference.timestep_shift, inference.num_train_timesteps)


def _segment_steps(record: np.ndarray, steps_per_segment) -> tuple[int, ...]:
    steps = (steps_per_segment,) * len(record) if np.isscalar(steps_per_segment) else tuple(steps_per_segment)
    if len(steps) != len(record) or min(steps) < 1:
        raise ValueError(f"steps_per_segment must be >= 1 for each of the {len(record)} segments, got {steps_per_segment}")
    return tuple(int(n) for n in steps)


def ode_sigma_grid(record: np.ndarray, steps_per_segment) -> np.ndarray:
    """Euler grid from record[0] down to 0 that passes through every recorded sigma: each segment
    between consecutive levels (and the last one to 0) split into equal steps, `steps_per_segment`
    of them (one count for all, or one per segment: the last, to 0, is where detail forms)."""
    steps = _segment_steps(np.asarray(record), steps_per_segment)
    levels = np.concatenate([np.asarray(record, np.float64), [0.0]])
    if np.any(np.diff(levels) >= 0):
        raise ValueError(f"recorded sigmas must decrease to 0, got {record}")
    parts = [np.linspace(a, b, n + 1)[:-1] for a, b, n in zip(levels[:-1], levels[1:], steps)]
    return np.concatenate([*parts, [0.0]]).astype(np.float32)


def record_indices(record: np.ndarray, steps_per_segment) -> np.ndarray:
    """Positions of the recorded sigmas in `ode_sigma_grid(record, steps_per_segment)` (int [S])."""
    steps = _segment_steps(np.asarray(record), steps_per_segment)
    return np.concatenate([[0], np.cumsum(steps)[:-1]]).astype(np.int32)


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

    text = teacher.encode_text(params, context)  # once: every Euler step reads the same prompt
    negative_text = teacher.encode_text(params, negative_context) if guidance_scale != 1.0 else None

    def velocity(x, sigma):
        t = jnp.full((b, f), sigma * num_train_timesteps, jnp.float32)
        v = sequence_forward(teacher, params, x, t, context, plan, time, text=text)
        if guidance_scale != 1.0:
            v_neg = sequence_forward(teacher, params, x, t, negative_context, plan, time, text=negative_text)
            v = v_neg + guidance_scale * (v - v_neg)
        return v

    def step(x, sigmas):
        s, s_next = sigmas[0], sigmas[1]
        return x + (s_next - s) * velocity(x, s), x

    pairs = jnp.stack([jnp.asarray(grid[:-1]), jnp.asarray(grid[1:])], axis=1)  # steps 2
    end, states = jax.lax.scan(step, noise.astype(jnp.float32), pairs)  # states: the x before each step
    recorded = states[record_indices(record, steps_per_segment)]  # the grid's record points: every segment's start
    return jnp.concatenate([jnp.moveaxis(recorded, 0, 1), end[:, None]], axis=1)


def causal_ode_trajectory(
    dit: CausalWanDiT,
    params: Params,
    noise: jax.Array,
    text: TextKV,
    inference: InferenceConfig = InferenceConfig(),
    steps_per_segment=12,
    record: np.ndarray | None = None,
    guidance_scale: float = 1.0,
    negative_text: TextKV | None = None,
) -> jax.Array:
    """A causal teacher's flow ODE as it streams: chunk by chunk with the KV cache, each chunk of noise
    [B, F, H, W, C] integrated by Euler steps through the recorded sigmas, its end then run through the
    cache-fill pass (at `inference.context_noise`) for the chunks after it. text / negative_text: the
    prompts' `dit.encode_text`. Classifier-free guidance (guidance_scale != 1) keeps a second cache
    for the negative prompt. Returns [B, S + 1, F, H, W, C] float32, the states at the S recorded
    sigmas and the end, chunk by chunk: the targets of `OdeRegression(clean_context=True)`."""
    record = record_sigmas(inference) if record is None else np.asarray(record, np.float32)
    guided = guidance_scale != 1.0
    if guided and negative_text is None:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs a negative_text")
    b, f, h, w, _ = noise.shape
    c, chunks = inference.frames_per_chunk, inference.num_chunks(f)
    grid = ode_sigma_grid(record, steps_per_segment)
    pairs = jnp.stack([jnp.asarray(grid[:-1]), jnp.asarray(grid[1:])], axis=1)  # steps 2
    rope = dit.rope_tables(f, h, w)
    caches = [dit.init_cache(inference, b, f, h, w)] * (2 if guided else 1)
    prompts = [text, negative_text] if guided else [text]
    scale = float(inference.num_train_timesteps)
    outs = []
    for i in range(chunks):
        start = jnp.int32(i * c)

        def step(carry, sigmas, start=start):
            x, caches = carry
            t = jnp.full((b, c), sigmas[0] * scale, jnp.float32)
            flows, caches = zip(*(dit.forward(params, x, t, p, cache, start, rope) for p, cache in zip(prompts, caches)))
            v = flows[0] if not guided else flows[1] + guidance_scale * (flows[0] - flows[1])
            return (x + (sigmas[1] - sigmas[0]) * v, list(caches)), x

        x = noise[:, i * c : (i + 1) * c].astype(jnp.float32)
        (end, caches), states = jax.lax.scan(step, (x, caches), pairs)  # states: the x before each step
        recorded = jnp.moveaxis(states[record_indices(record, steps_per_segment)], 0, 1)  # b s c h w ch
        outs.append(jnp.concatenate([recorded, end[:, None]], axis=1))
        if i + 1 < chunks:  # the cache-fill pass on the clean chunk
            t_ctx = jnp.full((b, c), inference.context_noise, jnp.float32)
            caches = [dit.forward(params, end, t_ctx, p, cache, start, rope)[1] for p, cache in zip(prompts, caches)]
    return jnp.concatenate(outs, axis=2)


class OdeRegression:
    """The student's loss on teacher trajectories: batch {'trajectory': [B, S + 1, F, H, W, C] (as
    `ode_trajectory` / `causal_ode_trajectory` return), 'text': [B, K, text_dim]}. Each block draws a
    step k in [0, S); the student's x0 = x_k - sigma_k v regresses onto the trajectory's end.

    clean_context False (Self-Forcing's ODE initialisation): the student sees every block's state
    block-causally at its sigma_k. True: it sees [the clean end | the states] under the teacher-forcing
    mask, each noisy block attending to the clean blocks before it, as the KV cache holds them when
    the sampler streams (the targets of `causal_ode_trajectory`). local_attn_size / sink_size (latent
    frames; -1 / 0: every earlier frame): each block attends only what a rolling KV cache of that
    window and sink holds at inference (`block_attention.context_ranges`), for trajectories longer
    than the window. mesh: a training mesh; with a 'seq' axis the student's sequence is split over it
    (Ulysses or ring attention, as `FlowObjective`'s)."""

    def __init__(
        self,
        dit: CausalWanDiT,
        record: np.ndarray | None = None,
        frames_per_block: int = 3,
        remat: bool = False,
        clean_context: bool = False,
        clean_timestep: float = 0.0,
        mesh=None,
        local_attn_size: int = -1,
        sink_size: int = 0,
    ):
        from causal_dit_jax.train.block_attention import check_window

        check_window(frames_per_block, local_attn_size, sink_size)
        self.dit, self.frames_per_block, self.remat, self.mesh = dit, frames_per_block, remat, mesh
        self.window = (local_attn_size, sink_size)
        self.clean_context, self.clean_timestep = clean_context, clean_timestep
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
        time = np.arange(f)
        if self.clean_context:
            seq = jnp.concatenate([traj[:, -1], x], axis=1)  # b (2 f) h w c: [clean end | states]
            ts = jnp.concatenate([jnp.full((b, f), self.clean_timestep, jnp.float32), t], axis=1)
            plan = teacher_forcing_plan(f, self.frames_per_block, *self.window)
            frame_time = np.concatenate([time, time])
            flow = sequence_forward(self.dit, params, seq, ts, batch["text"], plan, frame_time, self.remat, mesh=self.mesh)
            flow = flow[:, f:]
        else:
            plan = block_causal_plan(f, self.frames_per_block, *self.window)
            flow = sequence_forward(self.dit, params, x, t, batch["text"], plan, time, self.remat, mesh=self.mesh)
        x0 = x - sigma[:, :, None, None, None] * flow
        loss = jnp.mean((x0 - traj[:, -1]) ** 2)
        return loss, {"loss": loss, "mse": loss, "timestep": jnp.mean(t)}


__all__ = ["OdeRegression", "causal_ode_trajectory", "ode_sigma_grid", "ode_trajectory", "record_indices", "record_sigmas"]
