"""Self-Forcing's distribution matching distillation (DMD) on the generator's own KV-cached rollouts.

The generator rolls a video out chunk by chunk exactly as at inference (`generator_rollout`): per
chunk the few-step schedule up to an exit step, the chunk's x0 at the exit step is its output, then
the cache-fill pass. Only the exit step's forward keeps gradients (the same exit step for every chunk
of a rollout); the earlier steps and the cache-fill pass are stop-gradient, so the gradient is that of
one forward per chunk reading a cache of clean, gradient-free keys.

Two score models judge the video at a random noise level: the frozen teacher ("real score", with
classifier-free guidance) and the trainable critic ("fake score", trained by flow matching on the
generator's videos, `critic_loss`). They attend as the teacher was trained (`score_attention`):
'bidirectional' (Wan's base model, as in Self-Forcing: the noised clip as one block) or 'causal' (a
causal teacher such as a teacher-forcing run: block i of the noised clip is scored after the clean
generated blocks before it, the [clean | noisy] layout of teacher forcing, so each block's score is
the teacher's conditional one, as at its inference). The generator's loss is
0.5 * MSE(x, stopgrad(x - g)) with the normalised DMD gradient
g = (x0_fake - x0_real) / mean|x - x0_real| (per video), whose gradient in x is g itself.

Over a training mesh with a 'seq' axis (`DMD(..., mesh=)`), both parts split each sequence's tokens
over 'seq' and the batch over 'data': the score models through `sequence_forward`, the rollout's
cached chunk forwards through `SequenceRolloutModel` (the KV-cached attention under shard_map). The
same step gives one device's losses and gradients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax.sharding import Mesh

from causal_dit_jax.model.config import InferenceConfig
from causal_dit_jax.model.dit import CausalWanDiT, Params
from causal_dit_jax.model.sampler import SelfForcingSampler, draw_step_noise
from causal_dit_jax.model.scheduler import flow_match_timesteps
from causal_dit_jax.sharding.train_attention import sequence_size
from causal_dit_jax.train.block_attention import bidirectional_plan, teacher_forcing_plan
from causal_dit_jax.train.objectives import sequence_forward
from causal_dit_jax.train.sequence_rollout import SequenceRolloutModel

sg = jax.lax.stop_gradient


def generator_rollout(
    dit: CausalWanDiT,
    params: Params,
    noise: jax.Array,
    context: jax.Array,
    key: jax.Array,
    exit_step: int | jax.Array,
    inference: InferenceConfig = InferenceConfig(),
    mesh: Mesh | None = None,
) -> jax.Array:
    """The generator's video [B, F, H, W, C] float32 from noise [B, F, H, W, C] and text-encoder states
    context [B, K, text_dim], with the KV cache as at inference: the sampler's own step, re-noising and
    cache fill (`SelfForcingSampler`); exit_step (0 .. steps - 1, a Python int or traced: one program
    serves every exit step): the step whose x0 is each chunk's output, the only forward with
    gradients. key draws the re-noising eps as the sampler does (`draw_step_noise`). mesh: a training
    mesh; with a 'seq' axis each chunk's tokens split over it (`SequenceRolloutModel`)."""
    chunk_model = SequenceRolloutModel(dit, mesh) if sequence_size(mesh) > 1 else dit
    sampler = SelfForcingSampler(chunk_model, inference)
    n = len(sampler.timesteps)
    if isinstance(exit_step, int) and not 0 <= exit_step < n:
        raise ValueError(f"exit_step must be in [0, {n - 1}], got {exit_step}")
    ts, sig = jnp.asarray(sampler.timesteps, jnp.float32), jnp.asarray(sampler.sigmas, jnp.float32)
    sig_next = jnp.concatenate([sig[1:], jnp.zeros((1,), jnp.float32)])
    b, f, h, w, ch = noise.shape
    c, chunks = inference.frames_per_chunk, inference.num_chunks(f)
    text = dit.encode_text(params, context)
    text_sg, params_sg = sg(text), sg(params)
    rope = dit.rope_tables(f, h, w)

    def chunk(cache, xs):  # one chunk as at inference; a scan over the chunks keeps the program one chunk long
        x, i = xs  # x: b c h w ch, this chunk's noise
        eps = draw_step_noise(key, i, (b, c, h, w, ch), n)
        start = (i * c).astype(jnp.int32)

        def before_exit(k, carry):  # the steps before the exit: no gradients
            x, cache = carry
            x0, cache = sampler.step_x0(params_sg, sg(x), ts[k], sig[k], cache, text_sg, start, rope)
            return sampler.renoise(sg(x0), sig_next[k], eps[k]), cache

        # a traced exit_step makes this a while loop, which nothing differentiable may enter: the
        # trainer differentiates in the params alone, whose copy here is stop-gradient
        x, cache = jax.lax.fori_loop(0, exit_step, before_exit, (x, cache))
        x0, cache = sampler.step_x0(params, x, ts[exit_step], sig[exit_step], cache, text, start, rope)
        cache = jax.lax.cond(  # the cache-fill pass on the clean chunk, without gradients (none after the last)
            i + 1 < chunks,
            lambda cache: sg(sampler.fill_cache(params_sg, sg(x0), cache, text_sg, start, rope)),
            lambda cache: sg(cache),
            cache,
        )
        return cache, x0

    xs = rearrange(noise.astype(jnp.float32), "b (n c) h w ch -> n b c h w ch", c=c)
    _, outs = jax.lax.scan(chunk, sampler.init_cache(b, f, h, w), (xs, jnp.arange(chunks)))
    return rearrange(outs, "n b c h w ch -> b (n c) h w ch")


SCORE_ATTENTION = ("bidirectional", "causal")


@dataclasses.dataclass(frozen=True)
class DMDConfig:
    """guidance_scale: the teacher's classifier-free guidance (Self-Forcing: 3.0); timesteps of the
    score models drawn per video from the table indices [min_timestep, max_timestep); score_attention:
    how the teacher and critic attend (`SCORE_ATTENTION`, module docstring)."""

    guidance_scale: float = 3.0
    min_timestep: int = 20
    max_timestep: int = 980
    shift: float = 5.0
    score_attention: str = "bidirectional"

    def __post_init__(self):
        if self.score_attention not in SCORE_ATTENTION:
            raise ValueError(f"unknown score_attention {self.score_attention!r}; expected one of {list(SCORE_ATTENTION)}")


class DMD:
    """The generator's and the critic's losses. generator: the causal DiT being trained; teacher and
    critic: score models, attending as `config.score_attention` says (causal: in the chunks of
    `inference.frames_per_chunk`). mesh: a training mesh (`train_mesh`); with a 'seq' axis the rollout
    and the score models split each sequence's tokens over it (any number of heads)."""

    def __init__(
        self,
        generator: CausalWanDiT,
        teacher: CausalWanDiT,
        critic: CausalWanDiT,
        config: DMDConfig = DMDConfig(),
        inference: InferenceConfig = InferenceConfig(),
        mesh: Mesh | None = None,
    ):
        self.generator, self.teacher, self.critic = generator, teacher, critic
        self.config, self.inference, self.mesh = config, inference, mesh
        self.timesteps, self.sigmas = flow_match_timesteps(config.shift)

    def _noised(self, key: jax.Array, x: jax.Array):
        """x at one table timestep per video: (x_t, t [B, F], sigma [B, 1, 1, 1, 1], eps)."""
        cfg = self.config
        b, f = x.shape[:2]
        k_t, k_eps = jax.random.split(key)
        idx = jax.random.randint(k_t, (b,), cfg.min_timestep, cfg.max_timestep)
        t = jnp.repeat(jnp.asarray(self.timesteps)[idx][:, None], f, axis=1)
        sigma = jnp.asarray(self.sigmas)[idx][:, None, None, None, None]
        eps = jax.random.normal(k_eps, x.shape, jnp.float32)
        return (1.0 - sigma) * x + sigma * eps, t, sigma, eps

    def _flow(self, dit, params, xt, t, clean, context):
        """A score model's flow [B, F, H, W, C] at x_t [B, F, H, W, C] (t [B, F]); clean: the clean
        video x_t was noised from, the context of the causal layout (unused when bidirectional)."""
        b, f = xt.shape[:2]
        if self.config.score_attention == "bidirectional":
            return sequence_forward(dit, params, xt, t, context, bidirectional_plan(f), np.arange(f), mesh=self.mesh)
        seq = jnp.concatenate([sg(clean), xt], axis=1)  # b (2 f) h w c: [clean | noisy]
        ts = jnp.concatenate([jnp.zeros((b, f), jnp.float32), t], axis=1)  # the clean copy at t = 0
        time = np.arange(f)
        plan = teacher_forcing_plan(f, self.inference.frames_per_chunk)
        frame_time = np.concatenate([time, time])
        return sequence_forward(dit, params, seq, ts, context, plan, frame_time, mesh=self.mesh)[:, f:]

    def _rollout(self, params, batch, key, exit_step):
        noise, text = batch["noise"], batch["text"]
        return generator_rollout(self.generator, params, noise, text, key, exit_step, self.inference, self.mesh)

    def _x0(self, dit, params, xt, t, sigma, clean, context):
        return xt - sigma * self._flow(dit, params, xt, t, clean, context)

    def dmd_gradient(self, teacher_params, critic_params, video, batch, key) -> jax.Array:
        """The normalised DMD gradient g [B, F, H, W, C] at a random noise level (no gradients)."""
        video = sg(video)
        xt, t, sigma, _ = self._noised(key, video)
        cond = self._x0(self.teacher, teacher_params, xt, t, sigma, video, batch["text"])
        uncond = self._x0(self.teacher, teacher_params, xt, t, sigma, video, batch["negative_text"])
        real = uncond + self.config.guidance_scale * (cond - uncond)
        fake = self._x0(self.critic, critic_params, xt, t, sigma, video, batch["text"])
        norm = jnp.mean(jnp.abs(video - real), axis=(1, 2, 3, 4), keepdims=True)
        return sg(jnp.nan_to_num((fake - real) / norm))

    def generator_loss(self, params, teacher_params, critic_params, batch: dict, key: jax.Array, exit_step: int):
        """(loss, metrics) for the generator; batch {'text', 'negative_text': [B, K, text_dim], 'noise':
        [B, F, H, W, C]}."""
        k_roll, k_score = jax.random.split(key)
        video = self._rollout(params, batch, k_roll, exit_step)
        g = self.dmd_gradient(teacher_params, critic_params, video, batch, k_score)
        loss = 0.5 * jnp.mean((video - sg(video - g)) ** 2)
        return loss, {"loss": loss, "dmd_grad_norm": jnp.sqrt(jnp.mean(g**2))}

    def critic_loss(self, critic_params, generator_params, batch: dict, key: jax.Array, exit_step: int):
        """(loss, metrics) for the critic: flow matching (target eps - x0) on the generator's video."""
        k_roll, k_noise = jax.random.split(key)
        video = sg(self._rollout(generator_params, batch, k_roll, exit_step))
        xt, t, _, eps = self._noised(k_noise, video)
        flow = self._flow(self.critic, critic_params, xt, t, video, batch["text"])
        loss = jnp.mean((flow - (eps - video)) ** 2)
        return loss, {"loss": loss}


def exit_step_for(step: int, seed: int, num_steps: int) -> int:
    """The exit step of generator update `step`: drawn uniformly, the same on every host, and the same
    again when a run is resumed (a function of the seed and the step alone)."""
    return int(np.random.default_rng([seed, step]).integers(num_steps))


class DMDTrainer:
    """Alternates the critic's and the generator's updates: each `step` runs `critic_steps` critic
    updates on the generator's current videos, then one generator update (Self-Forcing's 5 : 1).
    Two train states ({'generator', 'critic'}), each as `Trainer` keeps them (float32 master weights,
    AdamW, EMA); the teacher's params are given to every step and never change."""

    def __init__(self, dmd: DMD, generator_optimizer, critic_optimizer, critic_steps: int = 5, mesh=None):
        from causal_dit_jax.train.trainer import Trainer

        if critic_steps < 1:
            raise ValueError(f"critic_steps must be >= 1, got {critic_steps}")
        self.dmd, self.critic_steps = dmd, critic_steps
        self.generator = Trainer(None, generator_optimizer, mesh)
        self.critic = Trainer(None, critic_optimizer, mesh)
        self._jit_step = jax.jit(self._step, donate_argnums=(0,))

    def init_state(self, generator_params: Params, critic_params: Params, seed: int = 0) -> dict:
        return {
            "generator": self.generator.init_state(generator_params, seed),
            "critic": self.critic.init_state(critic_params, seed + 1),
        }

    def _step(self, state, teacher_params, batch, exit_step: jax.Array):
        critic_state, gen_state = state["critic"], state["generator"]
        critic_grad = jax.value_and_grad(self.dmd.critic_loss, has_aux=True)

        def critic_update(_, carry):  # a loop, not unrolled: one critic update in the program
            critic_state, _ = carry
            key, sub = jax.random.split(jax.random.wrap_key_data(critic_state["rng"]))
            (loss, _), grads = critic_grad(critic_state["params"], sg(gen_state["params"]), batch, sub, exit_step)
            return self.critic.apply_gradients(critic_state, grads, key)[0], loss

        critic_state, critic_loss = jax.lax.fori_loop(
            0, self.critic_steps, critic_update, (critic_state, jnp.zeros((), jnp.float32))
        )
        critic_state = self._pin(critic_state)
        key, sub = jax.random.split(jax.random.wrap_key_data(gen_state["rng"]))
        gen_grad = jax.value_and_grad(self.dmd.generator_loss, has_aux=True)
        (_, gen_metrics), grads = gen_grad(
            gen_state["params"], teacher_params, sg(critic_state["params"]), batch, sub, exit_step
        )
        gen_state, update = self.generator.apply_gradients(gen_state, grads, key)
        metrics = {"generator_loss": gen_metrics["loss"], "critic_loss": critic_loss, **gen_metrics, **update}
        return self._pin({"generator": gen_state, "critic": critic_state}), metrics

    def _pin(self, state):
        """`state` kept on the trainers' state shardings (FSDP) inside the step: XLA's propagation through
        the critic loop would otherwise move it, and the next step would compile again (across
        processes, into another program)."""
        if self.generator.mesh is None:
            return state
        return jax.lax.with_sharding_constraint(state, self.generator.state_shardings(state))

    def step(self, state: dict, teacher_params: Params, batch: dict, seed: int = 0) -> tuple[dict, dict]:
        """One generator update after `critic_steps` critic updates; batch {'text', 'negative_text',
        'noise'}: the global batch, or across processes (jax.distributed) this process's rows of it or
        global arrays (`Trainer.place_batch`). The exit step follows from the generator's step number
        (`exit_step_for`)."""
        n = len(self.dmd.inference.denoising_steps)
        exit_step = exit_step_for(int(state["generator"]["step"]), seed, n)
        if self.generator.mesh is not None:
            batch = self.generator.place_batch(batch)
        state, metrics = self._jit_step(state, teacher_params, batch, jnp.int32(exit_step))  # one program for every exit step
        return state, {**metrics, "exit_step": exit_step}


__all__ = ["DMD", "DMDConfig", "SCORE_ATTENTION", "DMDTrainer", "exit_step_for", "generator_rollout"]
