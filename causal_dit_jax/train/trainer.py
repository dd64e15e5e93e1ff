"""The optax optimiser, the EMA, and the jitted train step, on one device or over a mesh's data axis.

The train state is a plain pytree: {'params' (float32 master weights), 'ema', 'opt_state', 'step'
(int32), 'rng' (uint32 key data)}. Compute runs in the model config's `dtype` (bf16) on the float32
weights. One call of `step` is one optimiser update over the whole batch, split into `accumulate`
micro-batches whose gradients are averaged (a scan: one micro-batch's activations at a time).

Over a mesh, the batch is split over the data axis and every parameter and optimiser leaf is sharded
over it too along its largest divisible dimension (FSDP: `fsdp_spec`, the one place PartitionSpecs are
made); XLA gathers each weight where it is used. The same step on 1 and N devices gives the same loss
and gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from causal_dit_jax.model.dit import Params
from causal_dit_jax.train.config import OptimizerConfig
from causal_dit_jax.train.objectives import FlowObjective

DATA_AXIS = "data"
MIN_SHARDED_SIZE = 1024  # leaves smaller than this stay replicated (norm scales, biases)


def train_mesh(num_devices: int | None = None, seq: int = 1) -> Mesh:
    """A mesh of `num_devices` (default all): num_devices / seq along the data axis and, with seq > 1,
    seq along a 'seq' axis that splits each sequence's tokens (`FlowObjective(..., mesh=)`). Auto axes:
    XLA propagates the shardings."""
    n = jax.device_count() if num_devices is None else num_devices
    if not 1 <= n <= jax.device_count():
        raise ValueError(f"a training mesh of {n} devices, but {jax.device_count()} are visible")
    if seq < 1 or n % seq:
        raise ValueError(f"seq={seq} does not divide {n} devices")
    devices = jax.devices()[:n]
    if seq == 1:
        return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((n // seq, seq), (DATA_AXIS, "seq"), axis_types=auto, devices=devices)


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak over warmup_steps, then cosine to final_lr_ratio * peak at
    total_steps, or constant."""
    peak = cfg.learning_rate
    if cfg.schedule == "cosine":
        decay = max(cfg.total_steps - cfg.warmup_steps, 1)
        after = optax.cosine_decay_schedule(peak, decay, alpha=cfg.final_lr_ratio)
    else:
        after = optax.constant_schedule(peak)
    if not cfg.warmup_steps:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup_steps), after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


def fsdp_spec(shape: tuple[int, ...], axis_size: int, axis: str = DATA_AXIS) -> PartitionSpec:
    """Shard a leaf over the data axis along its largest dimension divisible by the axis size (ties:
    the last); leaves below MIN_SHARDED_SIZE elements, or with no such dimension, are replicated."""
    size = 1
    for d in shape:
        size *= d
    if axis_size == 1 or size < MIN_SHARDED_SIZE:
        return PartitionSpec()
    best = None
    for i, d in enumerate(shape):
        if d % axis_size == 0 and (best is None or d >= shape[best]):
            best = i
    if best is None:
        return PartitionSpec()
    return PartitionSpec(*[axis if i == best else None for i in range(len(shape))])


class Trainer:
    """Builds and runs train steps of one objective. mesh: a mesh with a 'data' axis (or None: one
    device); params and optimiser state are FSDP-sharded over it, the batch split along it."""

    def __init__(self, objective: FlowObjective, optimizer: OptimizerConfig | None = None, mesh: Mesh | None = None):
        optimizer = OptimizerConfig() if optimizer is None else optimizer
        if mesh is not None and DATA_AXIS not in mesh.axis_names:
            raise ValueError(f"the training mesh needs a {DATA_AXIS!r} axis, got axes {mesh.axis_names}")
        self.objective, self.config, self.mesh = objective, optimizer, mesh
        self.tx = make_optimizer(optimizer)
        self.schedule = learning_rate_schedule(optimizer)

    # ------------------------------------------------------------------ state
    @staticmethod
    def step_of(state: dict) -> int:
        """Updates a state has had."""
        return int(state["step"])

    def init_state(self, params: Params, seed: int = 0) -> dict:
        """A fresh train state from (converted or random) params, cast to float32 master weights."""
        params = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)  # the step donates its state
        state = {
            "params": params,
            "ema": jax.tree.map(jnp.copy, params),
            "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed)),
        }
        if self.mesh is not None:
            state = jax.device_put(state, self.state_shardings(state))
        return state

    def state_shardings(self, state) -> object:
        """NamedShardings of a state (or its abstract ShapeDtypeStructs) over the mesh (FSDP)."""
        n = self.mesh.shape[DATA_AXIS]
        return jax.tree.map(lambda x: NamedSharding(self.mesh, fsdp_spec(tuple(x.shape), n)), state)

    def batch_sharding(self, batch) -> object:
        """The batch split along its leading axis over the data axis."""
        return jax.tree.map(lambda x: NamedSharding(self.mesh, PartitionSpec(DATA_AXIS)), batch)  # replicated over 'seq'

    def place_batch(self, batch: dict) -> dict:
        """The global batch on the mesh. One process: `batch` is the whole batch. Several
        (jax.distributed): each passes its own rows (its host's data shard, `make_dataset(...,
        shard_index=jax.process_index(), shard_count=jax.process_count())`) and the global batch is
        their concatenation in the order of the data axis's devices; arrays that are already global
        pass through."""
        shardings = self.batch_sharding(batch)
        if jax.process_count() == 1:
            return jax.device_put(batch, shardings)

        def place(x, sharding):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return jax.device_put(x, sharding)
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))

        return jax.tree.map(place, batch, shardings)

    # ------------------------------------------------------------------ the step
    def loss_and_grads(self, params: Params, batch: dict, key: jax.Array) -> tuple[jax.Array, dict, Params]:
        """(loss, metrics, grads) of the whole batch, averaged over `accumulate` micro-batches."""
        a = self.config.accumulate
        b = jax.tree.leaves(batch)[0].shape[0]
        if b % a:
            raise ValueError(f"batch {b} does not split into accumulate={a} micro-batches")
        micro = jax.tree.map(lambda x: x.reshape(a, b // a, *x.shape[1:]), batch)  # (a m) ... -> a m ...
        grad_fn = jax.value_and_grad(self.objective, has_aux=True)

        def body(total, xs):
            mb, k = xs
            (loss, metrics), grads = grad_fn(params, mb, k)
            return jax.tree.map(jnp.add, total, grads), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, metrics = jax.lax.scan(body, zeros, (micro, jax.random.split(key, a)))
        grads = jax.tree.map(lambda g: g / a, grads)
        metrics = jax.tree.map(jnp.mean, metrics)
        return metrics["loss"], metrics, grads

    def apply_gradients(self, state: dict, grads: Params, key: jax.Array) -> tuple[dict, dict]:
        """The optimiser update and the EMA from gradients: (new state with `key` as its rng, metrics
        {'grad_norm', 'learning_rate'})."""
        params = state["params"]
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        cfg = self.config
        decay = jnp.where(state["step"] >= cfg.ema_start, cfg.ema_decay, 0.0)  # before ema_start: a copy
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        metrics = {"grad_norm": optax.tree.norm(grads), "learning_rate": self.schedule(state["step"])}
        new = {"params": params, "ema": ema, "opt_state": opt_state, "step": state["step"] + 1, "rng": jax.random.key_data(key)}
        if self.mesh is not None:  # the state keeps its FSDP layout from step to step
            new = jax.lax.with_sharding_constraint(new, self.state_shardings(new))
        return new, metrics

    def _step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        key, sub = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        _, metrics, grads = self.loss_and_grads(state["params"], batch, sub)
        new, update_metrics = self.apply_gradients(state, grads, key)
        return new, {**metrics, **update_metrics}

    @functools.cached_property
    def _jit_step(self):
        return jax.jit(self._step, donate_argnums=(0,))

    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One optimiser update: (new state, metrics {'loss', 'mse', 'timestep', 'grad_norm',
        'learning_rate'}). The state is consumed (donated). Over several processes, `batch` is this
        process's rows of the global batch (`place_batch`)."""
        if self.mesh is not None:
            batch = self.place_batch(batch)
        return self._jit_step(state, batch)


__all__ = ["DATA_AXIS", "Trainer", "fsdp_spec", "learning_rate_schedule", "make_optimizer", "train_mesh"]
