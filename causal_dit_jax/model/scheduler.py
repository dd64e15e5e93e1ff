"""Flow-matching schedule of Self-Forcing (`FlowMatchScheduler`, shift 5, 1000 train steps)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def flow_match_timesteps(shift: float = 5.0, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Training timesteps T_j and sigmas s_j (float32, j = 0..999, T_0 = 1000).

    s = linspace(1, 0, N+1)[:-1]; sigma = shift*s / (1 + (shift-1)*s); T = N * sigma.
    """
    s = np.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=np.float32)[:-1]
    sigmas = (shift * s / (1 + (shift - 1) * s)).astype(np.float32)
    return (sigmas * num_train_timesteps).astype(np.float32), sigmas


def denoising_timesteps(
    steps: Sequence[int], shift: float = 5.0, num_train_timesteps: int = 1000, warp: bool = True
) -> np.ndarray:
    """The few-step schedule: [1000, 750, 500, 250] warps to [1000, 937.5, 833.33, 625] (float32)."""
    steps = np.asarray(steps, np.int64)
    if np.any(steps <= 0) or np.any(steps > num_train_timesteps):
        raise ValueError(f"denoising steps must lie in (0, {num_train_timesteps}], got {steps.tolist()}")
    if not warp:
        return steps.astype(np.float32)
    timesteps, _ = flow_match_timesteps(shift, num_train_timesteps)
    with_zero = np.concatenate([timesteps, np.zeros(1, np.float32)])
    return with_zero[num_train_timesteps - steps]


def sigma_for_timestep(t: float | np.ndarray, shift: float = 5.0, num_train_timesteps: int = 1000) -> np.ndarray:
    """sigma of the training timestep nearest to t (Self-Forcing's argmin |T - t| lookup)."""
    timesteps, sigmas = flow_match_timesteps(shift, num_train_timesteps)
    t = np.atleast_1d(np.asarray(t, np.float32))
    idx = np.argmin(np.abs(timesteps[None, :] - t[:, None]), axis=1)
    return sigmas[idx]
