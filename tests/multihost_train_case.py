"""The training run shared by the 2-process test (`multihost_train_worker.py`) and its single-process
reference: a tiny DiT, teacher forcing, over an 8-device data mesh (FSDP-sharded state), fed by
`make_dataset` shards the way `train.run` feeds each host."""

import jax
import numpy as np

from causal_dit_jax import CausalWanDiT
from causal_dit_jax.model.config import get_preset
from causal_dit_jax.train.config import OptimizerConfig
from causal_dit_jax.train.data import iterate, make_dataset
from causal_dit_jax.train.objectives import FlowObjective
from causal_dit_jax.train.run import RunConfig
from causal_dit_jax.train.trainer import Trainer, train_mesh

CFG = get_preset("tiny").replace(param_dtype="float32", dtype="float32")
GLOBAL_BATCH = 8  # one example per device
HOSTS = 2
STEPS = 4
SEED = 3  # the params' key, the state's rng and the data's shuffle, as `train.run.train` seeds them
LEARNING = {"learning_rate": 1e-3, "b1": 0.9}


def records() -> list[dict]:
    """16 fixed examples (two global batches' worth per epoch)."""
    rng = np.random.default_rng(0)
    return [
        {
            "latents": rng.standard_normal((6, 4, 6, CFG.in_dim)).astype(np.float32),
            "text": rng.standard_normal((CFG.text_len, CFG.text_dim)).astype(np.float32),
        }
        for _ in range(16)
    ]


def host_batches(host: int):
    """Host `host`'s stream: its shard of the records, GLOBAL_BATCH / HOSTS rows a batch."""
    return iterate(make_dataset(records(), GLOBAL_BATCH // HOSTS, seed=SEED, shard_index=host, shard_count=HOSTS))


def global_batches():
    """One process's view of the same run: every host's batch, stacked in process order (the order of
    the data axis's devices, so each host's rows land on its own devices)."""
    streams = [host_batches(h) for h in range(HOSTS)]
    while True:
        parts = [next(s) for s in streams]
        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def trainer() -> Trainer:
    """The trainer over all visible devices: 8, in one process or two."""
    return Trainer(FlowObjective(CausalWanDiT(CFG)), OptimizerConfig(**LEARNING), mesh=train_mesh(8))


def initial_state(t: Trainer) -> dict:
    return t.init_state(t.objective.dit.init(jax.random.key(SEED)), seed=SEED)


def train_steps(t: Trainer, state: dict, batches, steps: int) -> tuple[dict, list[float]]:
    losses = []
    for _ in range(steps):
        state, metrics = t.step(state, next(batches))
        losses.append(float(metrics["loss"]))
    return state, losses


def write_records(folder) -> None:
    """The records as a latents folder (`LatentTextSource` reads them in this order)."""
    from causal_dit_jax.train.data import write_latent_text_example

    for i, r in enumerate(records()):
        write_latent_text_example(folder, i, r["latents"], r["text"])


def run_config(out_dir, data) -> RunConfig:
    """`causal-dit train`'s run of the same steps over all 8 devices (the batch is global)."""
    return RunConfig.from_dict(
        {
            "out_dir": str(out_dir),
            "data": str(data),
            "model": CFG.to_dict(),
            "batch_size": GLOBAL_BATCH,
            "steps": STEPS,
            "seed": SEED,
            "mesh": 8,
            "save_every": 2,
            "log_every": 1,
            "optimizer": LEARNING,
        }
    )
