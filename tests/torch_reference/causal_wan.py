"""PyTorch reference of Self-Forcing's causal Wan2.1 DiT (``CausalWanModel``) for parity tests.

Written from ``shared/reference/self_forcing_wan_facts.md`` (the project's reference facts) ("facts"),
sections 1-6. Pure torch
(CPU, float32 or bfloat16 via ``model.to(torch.bfloat16)``), no flash-attn, no diffusers.

Precision follows Self-Forcing, not Wan2.1 (facts §3 "Precision"): everything runs in the parameter dtype
except the RMSNorm internals (fp32), RoPE (float64/complex128, cast back) and the time sinusoid (float64,
cast to the token dtype). The flow->x0 conversion runs in float64 (facts §6).

Letters: B batch, F latent frames, H/W latent rows/columns, L tokens, S cached keys, N heads, D head dim,
C channels, K text tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ROPE_ROWS = 1024  # facts §4: the position table has 1024 rows (max 1024 latent frames)


# ----------------------------------------------------------------------------------------------------
# Embedding helpers (facts §3.2, §4)
# ----------------------------------------------------------------------------------------------------
def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Facts §3.2: float64 sinusoid, half = dim/2, w_i = 10000^(-i/half), output [cos(t w), sin(t w)]."""
    half = dim // 2
    pos = t.to(torch.float64).flatten()
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    arg = torch.outer(pos, omega)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def rope_params(max_seq_len: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Facts §4: table[p, j] = exp(i p theta^(-2j/dim)), p < max_seq_len, j < dim/2; complex128 on CPU."""
    assert dim % 2 == 0, dim
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64, device="cpu").div(dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device="cpu"), inv)
    return torch.polar(torch.ones_like(angles), angles)


def rope_table(head_dim: int) -> torch.Tensor:
    """Facts §4: concat(rope_params(1024, d-4(d//6)), rope_params(1024, 2(d//6)) x2) -> [1024, d/2]."""
    d = head_dim
    return torch.cat(
        [rope_params(ROPE_ROWS, d - 4 * (d // 6)), rope_params(ROPE_ROWS, 2 * (d // 6)), rope_params(ROPE_ROWS, 2 * (d // 6))],
        dim=1,
    )


def causal_rope_apply(x: torch.Tensor, grid: tuple[int, int, int], freqs: torch.Tensor, start_frame: int = 0) -> torch.Tensor:
    """Facts §4 ``causal_rope_apply``: x [B,L,N,D], interleaved (re, im) pairs, complex128 math.

    Token i of the chunk with grid (f, h, w) gets concat(freqs_t[start_frame + i // (h w)],
    freqs_h[(i // w) % h], freqs_w[i % w]). Split of the D/2 pairs: [c - 2(c//3), c//3, c//3].
    """
    f, h, w = grid
    c = x.shape[-1] // 2
    if start_frame + f > freqs.shape[0]:
        raise ValueError(f"frames {start_frame}+{f} exceed the {freqs.shape[0]}-row RoPE table")
    ft, fh, fw = freqs.to(x.device).split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    rot = torch.cat(
        [
            ft[start_frame : start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
            fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
            fw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, c)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], c, 2))
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------------
# Modules (facts §2 names and shapes, §3 math)
# ----------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Facts §3.4: over the full dim (all heads together), fp32 internals, eps, times ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked softmax attention, scale 1/sqrt(D). q [B,L,N,D], k/v [B,S,N,D] -> [B,L,N*D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


class CausalSelfAttention(nn.Module):
    """Facts §3.4 self-attention with the §5 KV-cache update (normal and rolling paths)."""

    def __init__(self, dim: int, num_heads: int, local_attn_size: int = -1, sink_size: int = 0, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.local_attn_size, self.sink_size = local_attn_size, sink_size
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, grid, freqs, kv_cache=None, current_start=0):
        b, s, n, d = x.shape[0], x.shape[1], self.num_heads, self.head_dim
        tpf = grid[1] * grid[2]
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        start_frame = current_start // tpf
        q = causal_rope_apply(q, grid, freqs, start_frame).type_as(v)
        k = causal_rope_apply(k, grid, freqs, start_frame).type_as(v)
        if kv_cache is None:  # the chunk attends only to itself (bidirectional)
            return self.o(_attention(q, k, v))

        k_att, v_att = rolling_kv_cache_update(kv_cache, k, v, current_start, self.local_attn_size, self.sink_size, tpf)
        return self.o(_attention(q, k_att, v_att))


def rolling_kv_cache_update(
    kv_cache: dict,
    k: torch.Tensor,
    v: torch.Tensor,
    current_start: int,
    local_attn_size: int,
    sink_size: int,
    tokens_per_frame: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Facts §5, Self-Forcing's ``CausalWanSelfAttention`` cache step: write the new block's (roped) k, v
    [B, n, N, D] at global tokens [current_start, current_start + n) into ``kv_cache`` (in place) and
    return the keys/values it attends to, k/v[max(0, local_end - max_att) : local_end].

    Normal path: local_end = local_end_index + current_end - global_end_index (a repeated call on the
    same block has current_end == global_end and overwrites the same slots). Rolling path (only with a
    window, a new block, and local_end_index + n > S): evict = n + local_end_index - S tokens; the
    first sink = sink_size * tokens_per_frame tokens stay; rolled = local_end_index - evict - sink
    tokens shift left from [sink + evict, ...) to [sink, ...); the block is written at the end.
    """
    cache_size = kv_cache["k"].shape[1]
    s = k.shape[1]
    global_end = int(kv_cache["global_end_index"].item())
    local_end_old = int(kv_cache["local_end_index"].item())
    current_end = current_start + s
    sink = sink_size * tokens_per_frame
    # Global mode: the original hard-codes 32760 (= its cache size); here: the cache size.
    max_att = local_attn_size * tokens_per_frame if local_attn_size != -1 else cache_size
    if (
        local_attn_size != -1 and current_end > global_end and s + local_end_old > cache_size
    ):  # rolling path: evict, keep the sink
        evict = s + local_end_old - cache_size
        rolled = local_end_old - evict - sink
        for name in ("k", "v"):
            src = kv_cache[name][:, sink + evict : sink + evict + rolled].clone()
            kv_cache[name][:, sink : sink + rolled] = src
        local_end = local_end_old + current_end - global_end - evict
    else:  # normal path: append a new block, or overwrite the same slots on a repeated call
        local_end = local_end_old + current_end - global_end
    if not s <= local_end <= cache_size:
        raise ValueError(f"cache write [{local_end - s}, {local_end}) outside cache of {cache_size}")
    kv_cache["k"][:, local_end - s : local_end] = k
    kv_cache["v"][:, local_end - s : local_end] = v
    lo = max(0, local_end - max_att)
    kv_cache["global_end_index"].fill_(current_end)
    kv_cache["local_end_index"].fill_(local_end)
    return kv_cache["k"][:, lo:local_end], kv_cache["v"][:, lo:local_end]


class CrossAttention(nn.Module):
    """Facts §3.4: q = RMS(Wq x), k = RMS(Wk ctx), v = Wv ctx; no RoPE, no mask. Optional k/v cache."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, ctx, crossattn_cache=None):
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        if crossattn_cache is not None and crossattn_cache["is_init"]:
            k, v = crossattn_cache["k"], crossattn_cache["v"]
        else:
            k = self.norm_k(self.k(ctx)).view(b, -1, n, d)
            v = self.v(ctx).view(b, -1, n, d)
            if crossattn_cache is not None:  # facts §5: tensors are replaced, not written in place
                crossattn_cache.update(k=k, v=v, is_init=True)
        return self.o(_attention(q, k, v))


class CausalWanBlock(nn.Module):
    """Facts §3.4: modulated self-attn, cross-attn on LN3(x), modulated FFN; modulation per frame."""

    def __init__(self, dim, ffn_dim, num_heads, local_attn_size=-1, sink_size=0, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = CausalSelfAttention(dim, num_heads, local_attn_size, sink_size, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e0, ctx, grid, freqs, kv_cache=None, crossattn_cache=None, current_start=0):
        """x [B,L,dim] tokens; e0 [B,F,6,dim]. Each chunk of m is [B,F,1,dim], applied to [B,F,L/F,dim]."""
        nf = e0.shape[1]
        m = (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)

        def per_frame(t):  # [B,L,dim] -> [B,F,L/F,dim]
            return t.unflatten(1, (nf, t.shape[1] // nf))

        y = self.self_attn((per_frame(self.norm1(x)) * (1 + m[1]) + m[0]).flatten(1, 2), grid, freqs, kv_cache, current_start)
        x = x + (per_frame(y) * m[2]).flatten(1, 2)
        x = x + self.cross_attn(self.norm3(x), ctx, crossattn_cache)
        y = self.ffn((per_frame(self.norm2(x)) * (1 + m[4]) + m[3]).flatten(1, 2))
        return x + (per_frame(y) * m[5]).flatten(1, 2)


class Head(nn.Module):
    """Facts §3.5: (head.modulation + e) -> shift, scale; out = Linear(LN(x)(1 + scale) + shift)."""

    def __init__(self, dim, out_dim, patch_size, eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, e):
        """x [B,L,dim]; e [B,F,1,dim] (time_embedding output, not the projection) -> [B,F,L/F,out]."""
        nf = e.shape[1]
        shift, scale = (self.modulation.unsqueeze(1) + e).chunk(2, dim=2)
        return self.head(self.norm(x).unflatten(1, (nf, x.shape[1] // nf)) * (1 + scale) + shift)


class CausalWanModel(nn.Module):
    """Self-Forcing ``CausalWanModel`` (facts §1-§5); ``state_dict()`` matches facts §2 exactly.

    ``text_len`` (not in the original constructor) optionally zero-pads the context to ``text_len`` rows
    as Self-Forcing does for shorter inputs; ``None`` uses the context as given (pass [B,512,4096]).
    """

    def __init__(
        self,
        dim=1536,
        ffn_dim=8960,
        num_heads=12,
        num_layers=30,
        in_dim=16,
        out_dim=16,
        text_dim=4096,
        freq_dim=256,
        eps=1e-6,
        patch_size=(1, 2, 2),
        local_attn_size=-1,
        sink_size=0,
        text_len: int | None = None,
    ):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of even size")
        self.dim, self.ffn_dim, self.num_heads, self.num_layers = dim, ffn_dim, num_heads, num_layers
        self.in_dim, self.out_dim, self.text_dim, self.freq_dim = in_dim, out_dim, text_dim, freq_dim
        self.eps, self.patch_size, self.text_len = eps, tuple(patch_size), text_len
        self.local_attn_size, self.sink_size = local_attn_size, sink_size
        self.head_dim = dim // num_heads

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            CausalWanBlock(dim, ffn_dim, num_heads, local_attn_size, sink_size, eps) for _ in range(num_layers)
        )
        self.head = Head(dim, out_dim, self.patch_size, eps)
        self.freqs = rope_table(self.head_dim)  # plain attribute: not saved, not cast by .to(dtype)

    # -- cache helpers (facts §5) -----------------------------------------------------------------------
    def init_kv_cache(
        self, batch: int, cache_size_tokens: int, dtype=torch.float32, device="cpu", start_token: int = 0
    ) -> list[dict]:
        """One dict per layer: k, v zeros [B,S,N,D]; global_end_index = start_token, local_end_index = 0.

        ``start_token`` (not in the original, which always starts at 0) lets a fresh cache begin at a
        global token index > 0: the first call with current_start = start_token writes to local slot 0.
        """
        shape = (batch, cache_size_tokens, self.num_heads, self.head_dim)
        return [
            {
                "k": torch.zeros(shape, dtype=dtype, device=device),
                "v": torch.zeros(shape, dtype=dtype, device=device),
                "global_end_index": torch.tensor([start_token], dtype=torch.long, device=device),
                "local_end_index": torch.tensor([0], dtype=torch.long, device=device),
            }
            for _ in range(self.num_layers)
        ]

    def init_crossattn_cache(self, batch: int, text_len: int = 512, dtype=torch.float32, device="cpu") -> list[dict]:
        """One dict per layer: k, v zeros [B,K,N,D], is_init False (filled on first use, then reused)."""
        shape = (batch, text_len, self.num_heads, self.head_dim)
        return [
            {
                "k": torch.zeros(shape, dtype=dtype, device=device),
                "v": torch.zeros(shape, dtype=dtype, device=device),
                "is_init": False,
            }
            for _ in range(self.num_layers)
        ]

    # -- forward (facts §3) ---------------------------------------------------------------------------
    def unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Facts §3.6: [B,F,h*w,p*q*r*C] (C fastest) -> [B,C,F*p,h*q,w*r] via 'fhwpqrc->cfphqwr'."""
        (f, h, w), (p, q, r), c = grid, self.patch_size, self.out_dim
        u = out.reshape(out.shape[0], f, h, w, p, q, r, c)
        return torch.einsum("bfhwpqrc->bcfphqwr", u).reshape(out.shape[0], c, f * p, h * q, w * r)

    def forward(self, x, t, context, kv_cache=None, crossattn_cache=None, current_start=0):
        """x [B,C_in,F,H,W], t [B,F] (or [B]), context [B,K,text_dim] -> flow prediction [B,C_out,F,H,W].

        ``current_start`` is a token index; the RoPE start frame is current_start // tokens_per_frame.
        With ``kv_cache=None`` the chunk attends only to itself (RoPE still offset by current_start).
        Inputs are cast to the parameter dtype.
        """
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(dtype))  # [B,dim,F,h,w]
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # [B,L,dim], order f, h, w
        b, nf = x.shape[0], grid[0]
        if t.dim() == 1:
            t = t[:, None].expand(b, nf)
        assert t.shape == (b, nf), (t.shape, (b, nf))

        e = self.time_embedding(sinusoidal_embedding(self.freq_dim, t).type_as(x))  # [B*F,dim]
        e0 = self.time_projection(e).unflatten(1, (6, self.dim)).unflatten(0, (b, nf))  # [B,F,6,dim]
        context = context.to(dtype)
        if self.text_len is not None and context.shape[1] < self.text_len:
            context = F.pad(context, (0, 0, 0, self.text_len - context.shape[1]))
        ctx = self.text_embedding(context)

        for i, block in enumerate(self.blocks):
            x = block(
                x,
                e0,
                ctx,
                grid,
                self.freqs,
                None if kv_cache is None else kv_cache[i],
                None if crossattn_cache is None else crossattn_cache[i],
                current_start,
            )
        out = self.head(x, e.unflatten(0, (b, nf)).unsqueeze(2))  # [B,F,h*w,out*prod(patch)]
        return self.unpatchify(out, grid)


def randomize_parameters_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Test helper: overwrite every parameter with N(0, std) (norm weights 1 + N(0, std)), seeded.

    Non-trivial norm weights and biases catch weight-mapping mistakes that the default init hides.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            is_scale = name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight")
            p.copy_((noise + 1.0 if is_scale else noise).to(p.dtype))
    return model


# ----------------------------------------------------------------------------------------------------
# Scheduler (facts §6)
# ----------------------------------------------------------------------------------------------------
def flow_match_sigmas(shift: float = 5.0, num_train_timesteps: int = 1000):
    """Facts §6: s = linspace(1, 0, N+1)[:-1]; sigma = shift s / (1 + (shift-1) s); T = N sigma (float32)."""
    s = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)
    return sigmas * num_train_timesteps, sigmas  # (timesteps, sigmas)


def warped_denoising_steps(
    steps: Sequence[int] = (1000, 750, 500, 250), shift: float = 5.0, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """Facts §6 warp: t_k = cat(T, [0])[N - k] -> float32, e.g. [1000, 937.5, 833.33, 625]."""
    timesteps, _ = flow_match_sigmas(shift, num_train_timesteps)
    ext = torch.cat([timesteps, torch.zeros(1, dtype=torch.float32)])
    return ext[num_train_timesteps - torch.tensor(list(steps), dtype=torch.long)]


def sigma_for_timestep(t, shift: float = 5.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Facts §6: sigma at argmin |T - t| (lookup in float64); float32 result shaped like t."""
    timesteps, sigmas = flow_match_sigmas(shift, num_train_timesteps)
    t = torch.as_tensor(t, dtype=torch.float32)
    idx = torch.argmin((timesteps.double()[None, :] - t.double().reshape(-1, 1)).abs(), dim=1)
    return sigmas[idx].reshape(t.shape)


def _frame_sigma(t, like: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma for t (scalar, or [B,F] for pipeline layout [B,F,C,H,W]) broadcastable against ``like``.

    Never 0-d: like the original's [B*F,1,1,1] sigma, a float32 sigma then promotes bf16 math to fp32.
    """
    sigma = sigma_for_timestep(t, shift)
    if sigma.dim() == 2:
        return sigma.reshape(*sigma.shape, *[1] * (like.dim() - 2))
    return sigma.reshape([1] * like.dim())


def flow_to_x0(flow: torch.Tensor, xt: torch.Tensor, t, shift: float = 5.0) -> torch.Tensor:
    """Facts §6: x0 = x_t - sigma v in float64, cast back to flow's dtype."""
    sigma = _frame_sigma(t, xt, shift).double()
    return (xt.double() - sigma * flow.double()).to(flow.dtype)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t, shift: float = 5.0) -> torch.Tensor:
    """Facts §6: x_t = (1 - sigma) x0 + sigma eps with float32 sigma, cast to eps's dtype."""
    sigma = _frame_sigma(t, x0, shift)
    return ((1 - sigma) * x0 + sigma * eps).to(eps.dtype)


# ----------------------------------------------------------------------------------------------------
# Inference loop (facts §5)
# ----------------------------------------------------------------------------------------------------
def self_forcing_rollout(
    model: CausalWanModel,
    noise: torch.Tensor,
    context: torch.Tensor,
    denoising_timesteps,
    noise_fn: Callable[[int, int], torch.Tensor],
    num_frames_per_block: int = 3,
    context_noise: float = 0.0,
    local_attn_size: int = -1,
    sink_size: int = 0,
    cache_dtype=torch.float32,
    start_frame: int = 0,
    shift: float = 5.0,
    initial_latent: torch.Tensor | None = None,
) -> torch.Tensor:
    """Facts §5 T2V loop. noise [B,F_total,C,H,W] (pipeline layout) -> latents [B,F_total,C,H,W].

    Per block of ``num_frames_per_block`` frames: x = noise block; for each t_k in
    ``denoising_timesteps`` (already warped, e.g. ``warped_denoising_steps()``): v = model(x, t_k),
    x0 = x - sigma_k v; unless last, x = (1 - sigma_{k+1}) x0 + sigma_{k+1} eps with
    eps = noise_fn(block_index, k) (shaped like the block; cast to the model dtype, as the original's
    randn_like(x0)). The block output is the last x0. Then one cache-fill forward at t = context_noise
    on the clean x0 (no noise added, output discarded). The cache pass runs after every block, the last
    one included (as inference.py).

    ``local_attn_size``/``sink_size`` must equal the model's (they size the cache here; the model uses
    its own for the window/rolling). Cache size S: F_total * tokens_per_frame (global) or
    local_attn_size * tokens_per_frame (local); the original hard-codes 32760 for global mode, which
    equals F_total * 1560 for the default 21 frames.

    ``start_frame`` (not in the original): the rollout represents global latent frames
    [start_frame, start_frame + F_total). Block j is called with
    current_start = (start_frame + j * num_frames_per_block) * tokens_per_frame, so RoPE time
    positions are offset by start_frame. The cache is fresh but created with
    global_end_index = start_frame * tokens_per_frame (local_end_index 0), so local slots start at 0 and
    the caching/eviction behaves exactly like a start_frame = 0 rollout; nothing precedes frame
    start_frame in the cache. start_frame = 0 reproduces the original.

    ``initial_latent`` [B, P, C, H, W] (P a multiple of the block size): the original's context path for
    a model without an independent first frame: each block of it is copied to the output and run once
    at t = 0 into the cache, then the noise blocks follow from frame P. Output [B, P + F, C, H, W].
    """
    if (local_attn_size, sink_size) != (model.local_attn_size, model.sink_size):
        raise ValueError(
            f"rollout local_attn_size/sink_size {(local_attn_size, sink_size)} != model's "
            f"{(model.local_attn_size, model.sink_size)}"
        )
    num_input = 0 if initial_latent is None else initial_latent.shape[1]
    if initial_latent is not None:
        noise = torch.cat([initial_latent.to(noise.dtype), noise], dim=1)
    b, f_total, c, hgt, wid = noise.shape
    if f_total % num_frames_per_block or num_input % num_frames_per_block:
        raise ValueError(f"{f_total} frames is not a multiple of {num_frames_per_block}")
    _, ph, pw = model.patch_size
    tpf = (hgt // ph) * (wid // pw)
    cache_tokens = (local_attn_size if local_attn_size != -1 else f_total) * tpf
    dtype = model.patch_embedding.weight.dtype
    kv_cache = model.init_kv_cache(b, cache_tokens, cache_dtype, noise.device, start_token=start_frame * tpf)
    cross_cache = model.init_crossattn_cache(b, context.shape[1], cache_dtype, noise.device)
    steps = [float(s) for s in torch.as_tensor(denoising_timesteps, dtype=torch.float32)]

    def run(x_bfchw, t_value, current_start):
        t = torch.full((b, x_bfchw.shape[1]), t_value, dtype=torch.float32, device=noise.device)
        flow = model(x_bfchw.permute(0, 2, 1, 3, 4), t, context, kv_cache, cross_cache, current_start).permute(0, 2, 1, 3, 4)
        return flow, t

    output = torch.zeros_like(noise, dtype=dtype)
    for f0 in range(0, num_input, num_frames_per_block):  # the context blocks, at t = 0
        ref = initial_latent[:, f0 : f0 + num_frames_per_block].to(dtype)
        output[:, f0 : f0 + num_frames_per_block] = ref
        run(ref, 0.0, (start_frame + f0) * tpf)
    for j, f0 in enumerate(range(num_input, f_total, num_frames_per_block)):
        current_start = (start_frame + f0) * tpf
        x = noise[:, f0 : f0 + num_frames_per_block].to(dtype)
        for k, t_k in enumerate(steps):
            flow, t = run(x, t_k, current_start)
            x0 = flow_to_x0(flow, x, t, shift)
            if k < len(steps) - 1:
                eps = noise_fn(j, k).to(x0.dtype)
                x = add_noise(x0, eps, steps[k + 1], shift)
        output[:, f0 : f0 + num_frames_per_block] = x0
        run(x0, float(context_noise), current_start)  # cache pass on the clean block
    return output
