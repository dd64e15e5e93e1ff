"""PyTorch reference of Wan2.1's umT5-XXL text encoder (``T5Encoder``, encoder only) for parity tests.

Written from ``shared/reference/self_forcing_wan_facts.md`` (the project's reference facts) sections 2
and 9, with the state-dict
keys of ``models_t5_umt5-xxl-enc-bf16.pth``. Sizes are constructor arguments so tests run it tiny.

Math: pre-norm blocks with T5LayerNorm (RMS over the last axis in float32, eps 1e-6, a weight and no
bias); attention without 1/sqrt(d) scaling plus a bidirectional relative-position bias (one table per
layer unless ``shared_pos``); padded keys masked with finfo.min; softmax in float32; gated GELU-tanh FFN
fc2(fc1(x) * gelu_tanh(gate(x))); a final norm. Dropout is left out (inactive at eval).

Letters: B batch, L query tokens, S key tokens, N heads, D head dim, C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def relative_position_bucket(
    rel_pos: torch.Tensor, num_buckets: int = 32, max_dist: int = 128, bidirectional: bool = True
) -> torch.Tensor:
    """T5 bucketing of (key - query) offsets.

    Bidirectional: half the buckets per direction, +num_buckets/2 when the key lies after the query.
    Within a direction: exact buckets for |offset| < max_exact (= half of them), then log-spaced
    buckets up to max_dist, clamped to the last bucket beyond.
    """
    if bidirectional:
        num_buckets //= 2
        buckets = (rel_pos > 0).long() * num_buckets
        rel_pos = rel_pos.abs()
    else:
        buckets = torch.zeros_like(rel_pos, dtype=torch.long)
        rel_pos = -torch.clamp(rel_pos, max=0)
    max_exact = num_buckets // 2
    # float32 log, truncation toward zero (as Wan); log(0) = -inf only reaches the unused branch.
    large = (
        max_exact + (torch.log(rel_pos.float() / max_exact) / math.log(max_dist / max_exact) * (num_buckets - max_exact)).long()
    )
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel_pos < max_exact, rel_pos, large)


class T5LayerNorm(nn.Module):
    """RMS norm in float32 with a weight; the result is cast to the weight dtype when that is 16-bit."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class T5RelativeEmbedding(nn.Module):
    """Relative-position bias [1, N, L, S] from an Embedding(num_buckets, num_heads)."""

    def __init__(self, num_buckets: int, num_heads: int, bidirectional: bool = True, max_dist: int = 128):
        super().__init__()
        self.num_buckets, self.bidirectional, self.max_dist = num_buckets, bidirectional, max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq: int, lk: int) -> torch.Tensor:
        dev = self.embedding.weight.device
        rel = torch.arange(lk, device=dev)[None, :] - torch.arange(lq, device=dev)[:, None]  # key - query
        buckets = relative_position_bucket(rel, self.num_buckets, self.max_dist, self.bidirectional)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0).contiguous()  # l s n -> 1 n l s


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        assert dim_attn % num_heads == 0
        self.num_heads, self.head_dim = num_heads, dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, pos_bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.size(0), self.num_heads, self.head_dim
        q = self.q(x).view(b, -1, n, d)
        k = self.k(x).view(b, -1, n, d)
        v = self.v(x).view(b, -1, n, d)
        bias = x.new_zeros(b, n, q.size(1), k.size(1)) + pos_bias
        if mask is not None:
            bias = bias.masked_fill(mask.view(b, 1, 1, -1) == 0, torch.finfo(x.dtype).min)
        logits = torch.einsum("blnd,bsnd->bnls", q, k) + bias  # no 1/sqrt(d)
        attn = F.softmax(logits.float(), dim=-1).type_as(logits)
        out = torch.einsum("bnls,bsnd->blnd", attn, v).reshape(b, -1, n * d)
        return self.o(out)


class GELUTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), GELUTanh())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5SelfAttention(nn.Module):
    """One encoder block: x + attn(norm1(x)), then x + ffn(norm2(x))."""

    def __init__(
        self, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_buckets: int, shared_pos: bool, eps: float = 1e-6
    ):
        super().__init__()
        self.shared_pos = shared_pos
        self.norm1 = T5LayerNorm(dim, eps)
        self.attn = T5Attention(dim, dim_attn, num_heads)
        self.norm2 = T5LayerNorm(dim, eps)
        self.ffn = T5FeedForward(dim, dim_ffn)
        self.pos_embedding = None if shared_pos else T5RelativeEmbedding(num_buckets, num_heads)

    def forward(self, x, mask=None, pos_bias=None):
        e = pos_bias if self.shared_pos else self.pos_embedding(x.size(1), x.size(1))
        x = x + self.attn(self.norm1(x), mask, e)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nn.Module):
    """Wan's umT5 encoder. Defaults are umT5-XXL; tests pass tiny sizes."""

    def __init__(
        self,
        vocab: int = 256384,
        dim: int = 4096,
        dim_attn: int = 4096,
        dim_ffn: int = 10240,
        num_heads: int = 64,
        num_layers: int = 24,
        num_buckets: int = 32,
        shared_pos: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.shared_pos = shared_pos
        self.token_embedding = nn.Embedding(vocab, dim)
        self.pos_embedding = T5RelativeEmbedding(num_buckets, num_heads) if shared_pos else None
        self.blocks = nn.ModuleList(
            [T5SelfAttention(dim, dim_attn, dim_ffn, num_heads, num_buckets, shared_pos, eps) for _ in range(num_layers)]
        )
        self.norm = T5LayerNorm(dim, eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, L] int, mask [B, L] (1 = token, 0 = padding) -> [B, L, dim]."""
        x = self.token_embedding(ids)
        e = self.pos_embedding(x.size(1), x.size(1)) if self.shared_pos else None
        for block in self.blocks:
            x = block(x, mask, pos_bias=e)
        return self.norm(x)


def self_forcing_context(encoder: T5Encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Self-Forcing's text conditioning: the encoder output with rows past each prompt's length zeroed."""
    out = encoder(ids, mask).clone()
    for u, n in zip(out, mask.gt(0).sum(dim=1)):
        u[int(n) :] = 0.0
    return out


def randomize_parameters_(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Normal(0, std) weights; norm weights around 1 so both sides exercise the scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "pos_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(
                    std * torch.randn(p.shape, generator=g)
                    if "token_embedding" not in name
                    else torch.randn(p.shape, generator=g)
                )
    return model
