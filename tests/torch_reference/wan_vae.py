"""PyTorch reference of the Wan2.1 VAE (``wan/modules/vae.py``), decoder and encoder, for parity tests.

Written from ``shared/reference/self_forcing_wan_facts.md`` (the project's reference facts) sections 2
(VAE keys) and 8. State-dict
keys are Wan's own (``conv2.*``, ``decoder.conv1.*``, ``decoder.middle.{0,1,2}.*``,
``decoder.upsamples.{k}.*``, ``decoder.head.{0,2}.*``), so a real ``Wan2.1_VAE.pth`` loads into
``WanVAEDecoder(dim=96)`` with ``strict=False`` (its ``encoder.*`` and ``conv1.*`` keys are unused here).

Two decode semantics, both one latent frame per decoder call with a feature cache (CACHE_T = 2 input
frames per cached causal conv):
- ``streaming=False`` (Wan's ``WanVAE_.decode``): the cache starts empty (None); the first call marks
  every upsample3d ``'Rep'`` and skips its time_conv, so latent 0 gives 1 frame and T latents give
  1 + 4 (T - 1) frames.
- ``streaming=True`` (Self-Forcing ``demo_utils/vae_block3.py``): the cache starts as zero tensors
  (``ZERO_VAE_CACHE``), there is no ``'Rep'``, every latent gives 4 frames, and the cache is returned
  so the next block continues from it. The caller drops the first 3 frames of the first block.

The encoder (``WanVAEEncoder``: keys ``encoder.conv1.*``, ``encoder.downsamples.{k}.*``,
``encoder.middle.{0,1,2}.*``, ``encoder.head.{0,2}.*`` and the top-level ``conv1.*``) is Wan's
``Encoder3d`` plus ``conv1``; its ``encode`` is ``WanVAE_.encode``: frame 0 alone, then chunks of 4 frames,
one cache (empty at the start) carried through them. Each downsample3d keeps the last frame of its
input; the first call stores frame 0 and skips the time conv. The full file of a VAE is
``{**WanVAEDecoder(...).state_dict(), **WanVAEEncoder(...).state_dict()}`` (194 tensors at dim 96).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

CACHE_T = 2
# Facts §8: per-channel latent statistics of Wan2.1's VAE (z_raw = z * std + mean).
# fmt: off
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# fmt: on


class FeatCache:
    """Wan's ``feat_cache`` list and ``feat_idx`` counter in one object (plus the semantics flag)."""

    def __init__(self, size: int = 64, streaming: bool = False):
        self.maps: list = [None] * size
        self.idx = 0
        self.streaming = streaming

    def take(self, x: torch.Tensor):
        """The stored entry of the next cached conv; in streaming mode a missing one is ZERO_VAE_CACHE."""
        if self.maps[self.idx] is None and self.streaming:
            self.maps[self.idx] = torch.zeros_like(x[:, :, :1]).repeat(1, 1, CACHE_T, 1, 1)
        return self.maps[self.idx]

    def put(self, x: torch.Tensor, old) -> None:
        """Store the last CACHE_T input frames (a 1-frame input keeps the last frame of the old entry)."""
        new = x[:, :, -CACHE_T:].clone()
        if new.shape[2] < CACHE_T and old is not None:
            last = torch.zeros_like(new) if isinstance(old, str) else old[:, :, -1:]
            new = torch.cat([last, new], dim=2)
        self.maps[self.idx] = new
        self.idx += 1


class CausalConv3d(nn.Conv3d):
    """Conv3d padded 2p frames at the front and 0 at the back (causal in time), symmetric in space."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self._pad = (pw, pw, ph, ph, 2 * pt, 0)  # F.pad order: w, h, t
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        pad = list(self._pad)
        if cache_x is not None and pad[4] > 0:
            x = torch.cat([cache_x.to(x), x], dim=2)
            pad[4] -= cache_x.shape[2]
        return super().forward(F.pad(x, pad))

    def cached(self, x: torch.Tensor, cache: FeatCache | None) -> torch.Tensor:
        """Run with the feature cache (Wan's pattern around every cached conv)."""
        if cache is None:
            return self(x)
        old = cache.take(x)
        y = self(x, old)
        cache.put(x, old)
        return y


class RMS_norm(nn.Module):
    """F.normalize over channels (dim 1) * sqrt(C) * gamma; gamma [C,1,1,1] (video) or [C,1,1] (images)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """residual = [RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d]; 1x1x1 shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatCache | None = None) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer.cached(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no cache)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # b c t h w -> (b t) c h w
        qkv = self.to_qkv(self.norm(y)).reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)  # each [(b t), 1, (h w), c]
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        y = self.proj(y).reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)  # (b t) c h w -> b c t h w
        return x + y


class Resample(nn.Module):
    """upsample2d: nearest x2 + Conv2d C -> C/2 per frame. upsample3d: first a time_conv C -> 2C
    (k = (3,1,1)) whose two halves become two interleaved frames, then the same as upsample2d.
    downsample2d: ZeroPad2d((0, 1, 0, 1)) (right and bottom) + Conv2d C -> C, 3x3, stride 2, per frame.
    downsample3d: the same, then a time_conv C -> C (k = (3,1,1), stride (2,1,1), no padding) over
    [the last cached frame, the frames]; the first call (no cache) stores the frames and skips it."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        assert mode in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"), mode
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, cache: FeatCache | None = None) -> torch.Tensor:
        if self.mode.startswith("downsample"):
            return self._down(x, cache)
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and cache is not None:
            old = cache.take(x)
            if old is None:  # Wan, first latent: mark 'Rep' and skip the time conv (1 frame stays 1)
                cache.maps[cache.idx] = "Rep"
                cache.idx += 1
            else:
                x_in = x
                x = self.time_conv(x) if isinstance(old, str) else self.time_conv(x, old)
                cache.put(x_in, old)
                x = x.reshape(b, 2, c, t, h, w)
                x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)  # interleave in time
        t = x.shape[2]
        y = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)

    def _down(self, x: torch.Tensor, cache: FeatCache | None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        x = y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)  # (b t) c h w -> b c t h w
        if self.mode == "downsample3d" and cache is not None:
            old = cache.maps[cache.idx]
            if old is None:  # the video's first call (frame 0): keep it, no time conv
                cache.maps[cache.idx] = x.clone()
            else:
                last = x[:, :, -1:].clone()
                x = self.time_conv(torch.cat([old[:, :, -1:], x], dim=2))
                cache.maps[cache.idx] = last
            cache.idx += 1
        return x


class Decoder3d(nn.Module):
    """conv1, middle (Res, Attention, Res), upsamples (per stage: num_res_blocks + 1 Res, then a
    Resample except after the last stage), head (RMS_norm, SiLU, CausalConv3d -> 3)."""

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temperal_upsample: Sequence[bool] = (True, True, False),
        dropout: float = 0.0,
    ):
        super().__init__()
        dim_mult = list(dim_mult)
        dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0], dropout)
        )
        ups = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim = in_dim // 2  # the previous Resample halved the channels
            for _ in range(num_res_blocks + 1):
                ups.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                ups.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*ups)
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatCache | None = None) -> torch.Tensor:
        x = self.conv1.cached(x, cache)
        for layer in self.middle:
            x = layer(x, cache) if isinstance(layer, ResidualBlock) else layer(x)
        for layer in self.upsamples:
            x = layer(x, cache)
        for layer in self.head:
            x = layer.cached(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class WanVAEDecoder(nn.Module):
    """The decoder half of ``WanVAE_``: ``conv2`` (1x1x1 on the latent) and ``decoder``."""

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temperal_upsample: Sequence[bool] = (True, True, False),
    ):
        super().__init__()
        self.z_dim = z_dim
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, temperal_upsample)

    def decode(
        self, z: torch.Tensor, streaming: bool = False, cache: FeatCache | None = None
    ) -> tuple[torch.Tensor, FeatCache]:
        """z [B, z_dim, T, h, w] normalised latents -> (video [B, 3, T', H, W] in [-1, 1], cache).

        T' = 1 + 4 (T - 1) for Wan's decode (streaming=False, fresh cache), 4 T otherwise. Pass the
        returned cache back to continue a stream (Self-Forcing's per-block decode).
        """
        if cache is None:
            cache = FeatCache(streaming=streaming)
        mean = torch.tensor(LATENT_MEAN, dtype=z.dtype).view(1, self.z_dim, 1, 1, 1)
        std = torch.tensor(LATENT_STD, dtype=z.dtype).view(1, self.z_dim, 1, 1, 1)
        x = self.conv2(z / (1.0 / std) + mean)  # Wan divides by scale[1] = 1 / std
        outs = []
        for i in range(x.shape[2]):
            cache.idx = 0
            outs.append(self.decoder(x[:, :, i : i + 1], cache))
        return torch.cat(outs, dim=2).float().clamp(-1.0, 1.0), cache


class Encoder3d(nn.Module):
    """conv1 (3 -> dim), downsamples (per stage: num_res_blocks Res, then a Resample except after the
    last stage), middle (Res, Attention, Res), head (RMS_norm, SiLU, CausalConv3d -> z_dim)."""

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 32,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temperal_downsample: Sequence[bool] = (False, True, True),
        dropout: float = 0.0,
    ):
        super().__init__()
        dims = [dim * u for u in [1] + list(dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        downs = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                downs.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                downs.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*downs)
        self.middle = nn.Sequential(
            ResidualBlock(out_dim, out_dim, dropout), AttentionBlock(out_dim), ResidualBlock(out_dim, out_dim, dropout)
        )
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatCache | None = None) -> torch.Tensor:
        x = self.conv1.cached(x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        for layer in self.middle:
            x = layer(x, cache) if isinstance(layer, ResidualBlock) else layer(x)
        for layer in self.head:
            x = layer.cached(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


class WanVAEEncoder(nn.Module):
    """The encoder half of ``WanVAE_``: ``encoder`` (to 2 z_dim channels) and ``conv1`` (1x1x1)."""

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temperal_downsample: Sequence[bool] = (False, True, True),
    ):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder3d(dim, 2 * z_dim, dim_mult, num_res_blocks, temperal_downsample)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised mu [B, z_dim, 1 + k, H/8, W/8] (float32).

        Wan's order: frame 0 alone, then 4 frames at a time, one cache carried; mu = the first z_dim
        channels of conv1's output; (mu - mean) * (1 / std), as ``WanVAE_.encode`` with ``scale``.
        """
        cache = FeatCache()
        outs = []
        for i in range(1 + (x.shape[2] - 1) // 4):
            cache.idx = 0
            chunk = x[:, :, :1] if i == 0 else x[:, :, 1 + 4 * (i - 1) : 1 + 4 * i]
            outs.append(self.encoder(chunk, cache))
        mu, _ = self.conv1(torch.cat(outs, dim=2)).chunk(2, dim=1)
        mean = torch.tensor(LATENT_MEAN, dtype=mu.dtype).view(1, self.z_dim, 1, 1, 1)
        std = torch.tensor(LATENT_STD, dtype=mu.dtype).view(1, self.z_dim, 1, 1, 1)
        return ((mu - mean) * (1.0 / std)).float()


def randomize_vae_(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Test helper: conv weights N(0, 1/fan_in) (unit gain), biases and gamma - 1 N(0, std), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("gamma"):
                p.copy_(1.0 + std * noise)
            elif name.endswith("bias"):
                p.copy_(std * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in**0.5)
    return model
