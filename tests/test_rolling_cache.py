"""Frame-granular rolling KV cache against the PyTorch reference of Self-Forcing's shift-left eviction.

Self-Forcing counts local_attn_size and sink_size in latent frames; ours keeps whole-chunk slots and
masks, frame by frame, the keys Self-Forcing has evicted. Tolerance: relative error <= 1e-4 (float32,
||a-b||/||b|| per chunk), as in test_dit_parity: both sides run the same float32 math, the difference is
summation order and float32 (ours) vs float64 (PyTorch) RoPE/sinusoid angles. A wrong key set (a sink
rounded up to a chunk, or the unmasked held slots) changes the later chunks by far more (> 1e-3).
"""

import functools

import jax
import numpy as np
import pytest
import torch
from dit_fixtures import LATENT_H, LATENT_W, SMALL, rel_err, save_self_forcing_pt, torch_model
from torch_reference.causal_wan import self_forcing_rollout, warped_denoising_steps

from causal_dit_jax import CausalWanDiT, InferenceConfig, SelfForcingSampler
from causal_dit_jax.bench.flops import rollout_flops_parts
from causal_dit_jax.convert import load_dit_params
from causal_dit_jax.model.patchify import to_torch_layout
from causal_dit_jax.model.sampler import draw_step_noise

F32_TOL = 1e-4
FRAMES = 15  # 5 chunks: with local 6 / sink 1 the reference's cache rolls at chunks 2, 3 and 4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model = torch_model()
    _, params = load_dit_params(save_self_forcing_pt(model, tmp_path_factory.mktemp("ckpt") / "sf.pt"), SMALL)
    return model, params


def _inputs(seed):
    key = jax.random.key(seed)
    noise = jax.random.normal(jax.random.fold_in(key, 99), (1, FRAMES, LATENT_H, LATENT_W, SMALL.in_dim))
    ctx = jax.random.normal(jax.random.fold_in(key, 98), (1, SMALL.text_len, SMALL.text_dim))
    return key, noise, ctx


@functools.cache
def _reference(model, local, sink, start_frame, seed):
    """The reference rollout (the model's blocks set to the window), re-noised with our draws."""
    key, noise, ctx = _inputs(seed)
    model.local_attn_size, model.sink_size = local, sink
    for blk in model.blocks:
        blk.self_attn.local_attn_size, blk.self_attn.sink_size = local, sink
    steps = warped_denoising_steps()
    shape = (1, 3, LATENT_H, LATENT_W, SMALL.in_dim)

    def noise_fn(j, k):
        return torch.from_numpy(np.array(to_torch_layout(draw_step_noise(key, j, shape, len(steps))[k], "bfchw")))

    with torch.no_grad():
        ref = self_forcing_rollout(
            model,
            torch.from_numpy(np.array(to_torch_layout(noise, "bfchw"))),
            torch.from_numpy(np.array(ctx)),
            steps,
            noise_fn,
            local_attn_size=local,
            sink_size=sink,
            start_frame=start_frame,
        )
    return ref.numpy()


def _ours(params, local, sink, start_frame, seed):
    key, noise, ctx = _inputs(seed)
    inference = InferenceConfig(local_attn_size=local, sink_size=sink, cache_dtype="float32")
    dit = CausalWanDiT(SMALL)
    sampler = SelfForcingSampler(dit, inference)
    ours = sampler.generate(params, dit.encode_text(params, ctx), noise, key, start_frame=start_frame)
    return np.asarray(to_torch_layout(ours, "bfchw")), sampler.init_cache(1, FRAMES, LATENT_H, LATENT_W)


@pytest.mark.parametrize(
    "local,sink,start_frame,masked",
    [
        (6, 1, 0, True),  # the 1-frame sink: frames 1, 2 of the sink chunk are evicted at chunk 2
        (6, 3, 0, False),  # whole chunks: the fast prefix path, unchanged
        (7, 2, 4, True),  # neither is whole chunks; a stream starting at global frame 4
        (4, 0, 0, True),  # no sink, a window of a chunk and a frame
    ],
)
def test_frame_granular_window_matches_self_forcing(converted, local, sink, start_frame, masked):
    model, params = converted
    ours, cache = _ours(params, local, sink, start_frame, seed=local + sink)
    assert cache.frame_masked == masked
    ref = _reference(model, local, sink, start_frame, local + sink)
    for j in range(FRAMES // 3):
        assert rel_err(ours[:, 3 * j : 3 * j + 3], ref[:, 3 * j : 3 * j + 3]) <= F32_TOL, f"chunk {j}"


def test_the_frame_mask_matters(converted):
    """The 6-frame window with a 1-frame sink is neither the 3-frame sink (the sink rounded up to a
    chunk) nor all held slots unmasked (sink chunk + 2 ring chunks = a 9-frame window with a 3-frame
    sink): those references differ from ours by far more than the tolerance from chunk 2 on."""
    model, params = converted
    ours, _ = _ours(params, 6, 1, 0, seed=7)
    assert rel_err(ours, _reference(model, 6, 1, 0, 7)) <= F32_TOL
    for local, sink in ((6, 3), (9, 3)):
        wrong = _reference(model, local, sink, 0, 7)
        assert rel_err(ours[:, 6:], wrong[:, 6:]) > 1e-3, (local, sink)


def test_rollout_flops_count_the_frame_granular_window():
    """Chunk j attends to min(3 (j + 1), window) frames: 3, 6, 7, 7, 7 frames for a 7-frame window
    (exact: integer token counts times 4 L C per layer)."""
    chunk_tokens, fwd = 6 * 4, 5  # 3 frames of 8 tokens
    got = rollout_flops_parts(SMALL, chunk_tokens, 5, fwd, window_frames=7)["self_attention"]
    attended = sum(f * 8 for f in (3, 6, 7, 7, 7))
    assert got == fwd * SMALL.num_layers * 4 * chunk_tokens * attended * SMALL.dim
    # -1 is the whole history, as no window
    assert rollout_flops_parts(SMALL, chunk_tokens, 5, fwd) == rollout_flops_parts(
        SMALL, chunk_tokens, 5, fwd, window_frames=-1
    )
