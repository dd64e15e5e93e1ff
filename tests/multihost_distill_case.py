"""The distillation runs shared by the 2-process test (`multihost_distill_worker.py`) and its
single-process reference: `train.run.train` of ODE regression and of DMD over an 8-device data mesh
(FSDP-sharded state, teacher and critic), a tiny float32 DiT distilling a tiny teacher, on 16 prompts."""

import numpy as np

from causal_dit_jax.model.config import get_preset
from causal_dit_jax.train.data import iterate, make_dataset
from causal_dit_jax.train.run import RunConfig

CFG = get_preset("tiny")  # float32
HOSTS = 2
GLOBAL_BATCH = 8  # one prompt per device
PROMPTS = 16  # one epoch: two global batches, so each run's two steps read every prompt once
STEPS = 2
SEED = 5
KINDS = ("ode_regression", "dmd")
DMD_STOP_AFTER = 1  # the DMD run across the hosts stops here and resumes


def texts() -> np.ndarray:
    """The prompts' text states [PROMPTS, K, D] and the negative prompt's [K, D]."""
    rng = np.random.default_rng(1)
    return rng.standard_normal((PROMPTS + 1, CFG.text_len, CFG.text_dim)).astype(np.float32)


def _order(host: int | None) -> np.ndarray:
    """The record indices the run's first epoch reads, batch after batch: one host's shard (host) or
    the whole folder in one process (None)."""
    shard = {} if host is None else {"shard_index": host, "shard_count": HOSTS}
    rows = GLOBAL_BATCH if host is None else GLOBAL_BATCH // HOSTS
    it = iterate(make_dataset([{"i": i} for i in range(PROMPTS)], rows, SEED, **shard))
    return np.stack([next(it)["i"] for _ in range(STEPS)])  # steps rows


def one_process_order() -> np.ndarray:
    """For each record index of the one-process folder, the hosts' record it holds: one process then
    reads, batch after batch, the hosts' global batches (each host's rows in process order)."""
    hosts = np.concatenate([_order(h) for h in range(HOSTS)], axis=1).reshape(-1)  # global batches, flat
    held = np.empty(PROMPTS, np.int64)
    held[_order(None).reshape(-1)] = hosts
    return held


def write_inputs(root) -> None:
    """root/teacher and root/critic (checkpoints), root/data (the hosts' prompts) and root/data_one (the
    same prompts in the order one process reads as the hosts' global batches), each with the negative
    prompt."""
    import jax

    from causal_dit_jax.model.dit import CausalWanDiT
    from causal_dit_jax.train.checkpoints import export_inference_checkpoint
    from causal_dit_jax.train.data import write_negative_text, write_text_example

    for name, key in (("teacher", 7), ("critic", 8)):
        export_inference_checkpoint(CausalWanDiT(CFG).init(jax.random.key(key)), CFG, root / name)
    *prompts, negative = texts()
    for folder, order in (("data", np.arange(PROMPTS)), ("data_one", one_process_order())):
        for i, j in enumerate(order):
            write_text_example(root / folder, i, prompts[j])
        write_negative_text(root / folder, negative)


def run_config(kind: str, out_dir, data, root) -> RunConfig:
    """`causal-dit train`'s distillation run over all 8 devices (the batch is global), of the teacher
    (and DMD's critic) in `root`."""
    critic = {"critic": str(root / "critic")} if kind == "dmd" else {}
    return RunConfig.from_dict(
        {
            "out_dir": str(out_dir),
            "data": str(data),
            "teacher": str(root / "teacher"),
            **critic,
            "model": CFG.to_dict(),
            "batch_size": GLOBAL_BATCH,
            "steps": STEPS,
            "seed": SEED,
            "mesh": 8,
            "save_every": STEPS,  # DMD's stop after step 1 saves too
            "log_every": 1,
            "objective": {"kind": kind},
            "optimizer": {"learning_rate": 1e-3, "b1": 0.9},
            "distill": {
                "latent_frames": 6,  # two chunks of 3: the KV cache's fill pass runs
                "latent_height": 4,
                "latent_width": 4,
                "denoising_steps": [1000, 500],
                "guidance_scale": 2.0,  # the negative prompt's rows are read
                "ode_steps_per_segment": 1,
                "critic_steps": 1,
            },
        }
    )
