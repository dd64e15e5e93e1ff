"""Training objectives on the causal DiT: teacher forcing and diffusion forcing (flow matching).

Both draw one timestep per block of latent frames from the shifted training table (Self-Forcing's
`FlowMatchScheduler`, 1000 entries), noise x_t = (1 - sigma) x0 + sigma eps, and regress the flow
target eps - x0 with a per-frame MSE, weighted by the table's bell-shaped weight. Teacher forcing runs
the sequence [clean x0 | noisy x_t] with both copies at the same Causal-RoPE positions under
`teacher_forcing_plan` and scores the noisy half; diffusion forcing runs x_t alone, block-causal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from causal_dit_jax.model.dit import CausalWanDiT, Params
from causal_dit_jax.model.kv_cache import TextKV
from causal_dit_jax.model.patchify import latents_to_tokens, tokens_to_latents
from causal_dit_jax.model.scheduler import flow_match_timesteps
from causal_dit_jax.sharding.train_attention import SEQ, sequence_size
from causal_dit_jax.train.block_attention import (
    BlockAttentionPlan,
    block_causal_plan,
    make_block_attention,
    teacher_forcing_plan,
)
from causal_dit_jax.train.config import ObjectiveConfig


def bell_weights(timesteps: np.ndarray) -> np.ndarray:
    """Self-Forcing's training weight per table entry: exp(-2 ((T - N/2) / N)^2), shifted to a zero
    minimum and scaled to mean 1 (float32 [N])."""
    n = len(timesteps)
    y = np.exp(-2.0 * ((timesteps.astype(np.float64) - n / 2) / n) ** 2)
    y = y - y.min()
    return (y * (n / y.sum())).astype(np.float32)


def sequence_forward(
    dit: CausalWanDiT,
    params: Params,
    x: jax.Array,
    t: jax.Array,
    context: jax.Array,
    plan: BlockAttentionPlan,
    frame_time: np.ndarray,
    remat: bool = False,
    implementation: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    text: TextKV | None = None,
) -> jax.Array:
    """The DiT over a whole sequence: latents x [B, F, H, W, C], timesteps t [B, F], text-encoder states
    context [B, K, text_dim], attention under `plan`, frame_time [F] (static numpy: each frame's RoPE
    time) -> flow [B, F, H, W, C] float32. No KV cache; differentiable in params.
    mesh: a training mesh (`train_mesh`). With a 'seq' axis, the patch tokens [B, L, C] are split over
    'data' x 'seq' (`sequence_sharding`), XLA partitions the blocks along them, and the attention runs
    over 'seq' without gathered keys and values (`make_block_attention(..., mesh=)`): Ulysses (two
    all-to-alls) when the heads divide by the 'seq' size, else ring attention (any number of heads).
    The tokens must split over 'seq' (checked when traced).
    text: `dit.encode_text(params, context)` made once by a caller that runs many forwards of one
    prompt (an ODE's Euler steps); context is then not read."""
    frame_time = np.asarray(frame_time, np.int32)
    if frame_time.shape != (x.shape[1],) or plan.num_frames != x.shape[1]:
        raise ValueError(f"{x.shape[1]} frames, {frame_time.shape} frame times, a plan of {plan.num_frames} frames")
    text = dit.encode_text(params, context) if text is None else text
    tokens, grid = latents_to_tokens(dit.config, x, t)
    _, gh, gw = grid
    rope = dit.rope_tables(int(frame_time.max()) + 1, x.shape[2], x.shape[3])
    token_sharding = sequence_sharding(mesh)
    attention = make_block_attention(plan, gh * gw, implementation, mesh)
    if token_sharding is not None:
        tokens = jax.lax.with_sharding_constraint(tokens, token_sharding)
    out, _ = dit.forward_tokens(
        params, tokens, t, text, None, 0, rope, grid=grid, attention_fn=attention, frame_time=frame_time, remat=remat
    )
    if token_sharding is not None:
        out = jax.lax.with_sharding_constraint(out, token_sharding)
    return tokens_to_latents(dit.config, out, grid)


def sequence_sharding(mesh: jax.sharding.Mesh | None) -> jax.sharding.NamedSharding | None:
    """Tokens [B, L, C] with the batch over 'data' and the sequence over 'seq', for a mesh that has a
    'seq' axis (None otherwise: the tokens follow the batch)."""
    if sequence_size(mesh) == 1:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec("data" if "data" in mesh.axis_names else None, SEQ, None))


class FlowObjective:
    """Teacher forcing or diffusion forcing (`ObjectiveConfig.kind`) as a pure loss of (params, batch,
    key). batch: {'latents': [B, F, H, W, C] clean latents, 'text': [B, K, text_dim] encoder states}."""

    def __init__(self, dit: CausalWanDiT, config: ObjectiveConfig | None = None, remat: bool = False, mesh=None):
        config = ObjectiveConfig() if config is None else config
        self.dit, self.config, self.remat = dit, config, remat
        self.mesh = mesh  # with a 'seq' axis: Ulysses or ring attention, any heads (`sequence_forward`)
        timesteps, sigmas = flow_match_timesteps(config.shift, config.num_train_timesteps)
        self.timesteps, self.sigmas = timesteps, sigmas
        self.weights = bell_weights(timesteps) if config.bell_weight else np.ones_like(timesteps)

    def plan(self, num_frames: int) -> BlockAttentionPlan:
        cfg = self.config
        view = (cfg.frames_per_block, cfg.local_attn_size, cfg.sink_size)  # block, rolling window, sink
        if cfg.kind == "teacher_forcing":
            return teacher_forcing_plan(num_frames, *view)
        return block_causal_plan(num_frames, *view)

    def draw(self, key: jax.Array, x0: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-block table indices [B, F] (equal inside a block) and the noise eps like x0."""
        cfg = self.config
        b, f = x0.shape[:2]
        if f % cfg.frames_per_block:
            raise ValueError(f"{f} latent frames are not whole blocks of {cfg.frames_per_block}")
        k_t, k_eps = jax.random.split(key)
        idx = jax.random.randint(k_t, (b, f // cfg.frames_per_block), cfg.min_timestep, cfg.max_timestep)
        idx = jnp.repeat(idx, cfg.frames_per_block, axis=1)  # b f: one draw per block
        return idx, jax.random.normal(k_eps, x0.shape, jnp.float32)

    def __call__(self, params: Params, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        """(loss, metrics): the weighted flow-matching MSE over the scored frames."""
        x0 = batch["latents"].astype(jnp.float32)
        b, f = x0.shape[:2]
        idx, eps = self.draw(key, x0)
        t = jnp.asarray(self.timesteps)[idx]  # b f
        sigma = jnp.asarray(self.sigmas)[idx][:, :, None, None, None]
        xt = (1.0 - sigma) * x0 + sigma * eps
        target = eps - x0
        time = np.arange(f)
        if self.config.kind == "teacher_forcing":
            seq = jnp.concatenate([x0, xt], axis=1)  # b (2 f) h w c: [clean | noisy]
            ts = jnp.concatenate([jnp.full((b, f), self.config.clean_timestep, jnp.float32), t], axis=1)
            frame_time = np.concatenate([time, time])  # both copies at the same positions
            flow = sequence_forward(
                self.dit, params, seq, ts, batch["text"], self.plan(f), frame_time, self.remat, mesh=self.mesh
            )
            flow = flow[:, f:]
        else:
            flow = sequence_forward(self.dit, params, xt, t, batch["text"], self.plan(f), time, self.remat, mesh=self.mesh)
        per_frame = jnp.mean((flow - target) ** 2, axis=(2, 3, 4))  # b f
        weight = jnp.asarray(self.weights)[idx]
        loss = jnp.mean(per_frame * weight)
        return loss, {"loss": loss, "mse": jnp.mean(per_frame), "timestep": jnp.mean(t)}


__all__ = ["FlowObjective", "bell_weights", "sequence_forward", "sequence_sharding"]
