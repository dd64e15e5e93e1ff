"""PyTorch reference of the TAEHV decoder and encoder (the `taew2_1.pth` architecture) for parity tests.

Written for this project from the published architecture: a `decoder` nn.Sequential whose indices are
the checkpoint's key names (`decoder.1.weight`, `decoder.3.conv.0.weight`, `decoder.7.conv.weight`,
...), and an `encoder` Sequential of the published layout (`encoder.0.weight`, `encoder.2.conv.weight`,
`encoder.4.conv.0.weight`, ... `encoder.17.weight`), so a state dict of this module has every key a
real `taew2_1.pth` has (the decoder converter ignores the encoder half, the encoder converter the
decoder half).

Encoding (`encode_video`) is likewise frame by frame: each time-pool layer collects `stride` frames
before passing one on, each memory block remembers its previous input; T is first padded at the end
with copies of the last frame to a multiple of the time factor, as the published `encode_video`.

Decoding here is deliberately the other algorithm from the Flax port: one frame at a time through the
layer list, each memory block remembering its previous input, each time-grow layer emitting its
frames in order. The Flax decoder runs all frames of a chunk in parallel, so agreement checks the
time alignment as well as the arithmetic. The first (time factor - 1) output frames are dropped, and
frames are returned in [0, 1] (NTCHW).
"""

from __future__ import annotations

import torch
from torch import nn


def conv(c_in: int, c_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias, stride=stride)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(conv(cat[x, past]) + skip(x)); `conv` is conv-relu-conv-relu-conv (indices 0, 2, 4)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv(2 * c_in, c_out), nn.ReLU(), conv(c_out, c_out), nn.ReLU(), conv(c_out, c_out))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x, past):
        return torch.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    def __init__(self, c: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c, c * stride, 1, bias=False)

    def forward(self, x):  # [1, C, H, W] -> list of `stride` frames [1, C, H, W]
        return list(self.conv(x).chunk(self.stride, dim=1))


class TPool(nn.Module):  # encoder only
    def __init__(self, c: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(c * stride, c, 1, bias=False)

    def forward(self, frames):  # list of `stride` frames [1, C, H, W] -> [1, C, H, W]
        return self.conv(torch.cat(frames, 1))


class TAEHVReference(nn.Module):
    def __init__(
        self,
        latent_channels: int = 16,
        channels=(256, 128, 64, 64),
        time_upscale=(False, True, True),
        space_upscale=(True, True, True),
        patch_size: int = 1,
        encoder_width: int = 64,
        encoder_time_downscale=(True, True, False),
    ):
        super().__init__()
        self.patch_size = patch_size
        c, e = channels, encoder_width
        enc: list[nn.Module] = [conv(3 * patch_size**2, e), nn.ReLU()]
        for s in range(3):
            enc += [TPool(e, 2 if encoder_time_downscale[s] else 1), conv(e, e, bias=False, stride=2)]
            enc += [MemBlock(e, e) for _ in range(3)]
        enc += [conv(e, latent_channels)]
        self.encoder = nn.Sequential(*enc)
        self.t_downscale = 2 ** sum(encoder_time_downscale)
        layers: list[nn.Module] = [Clamp(), conv(latent_channels, c[0]), nn.ReLU()]
        for s in range(3):
            layers += [MemBlock(c[s], c[s]) for _ in range(3)]
            layers += [
                nn.Upsample(scale_factor=2 if space_upscale[s] else 1),
                TGrow(c[s], 2 if time_upscale[s] else 1),
                conv(c[s], c[s + 1], bias=False),
            ]
        layers += [nn.ReLU(), conv(c[3], 3 * patch_size**2)]
        self.decoder = nn.Sequential(*layers)
        self.frames_to_trim = 2 ** sum(time_upscale) - 1

    @torch.no_grad()
    def decode_video(self, z: torch.Tensor) -> torch.Tensor:
        """z [N=1, T, C, h, w] -> frames [1, T', 3, H, W] in [0, 1], one frame at a time."""
        assert z.shape[0] == 1
        memory: dict[int, torch.Tensor] = {}
        out: list[torch.Tensor] = []

        def run(x: torch.Tensor, start: int) -> None:
            for i in range(start, len(self.decoder)):
                layer = self.decoder[i]
                if isinstance(layer, MemBlock):
                    past = memory.get(i, torch.zeros_like(x))
                    memory[i] = x
                    x = layer(x, past)
                elif isinstance(layer, TGrow):
                    for frame in layer(x):
                        run(frame, i + 1)
                    return
                else:
                    x = layer(x)
            out.append(x)

        for t in range(z.shape[1]):
            run(z[:, t], 0)
        video = torch.stack(out, 1)
        if self.patch_size > 1:
            video = torch.stack([nn.functional.pixel_shuffle(f, self.patch_size) for f in video.unbind(1)], 1)
        return video[:, self.frames_to_trim :].clamp(0, 1)

    @torch.no_grad()
    def encode_video(self, x: torch.Tensor) -> torch.Tensor:
        """x [N=1, T, 3, H, W] in [0, 1] -> latents [1, ceil(T / t_downscale), C, H/8, W/8], one frame at a time."""
        assert x.shape[0] == 1
        if self.patch_size > 1:
            x = torch.stack([nn.functional.pixel_unshuffle(f, self.patch_size) for f in x.unbind(1)], 1)
        if x.shape[1] % self.t_downscale:
            pad = self.t_downscale - x.shape[1] % self.t_downscale
            x = torch.cat([x, x[:, -1:].repeat_interleave(pad, dim=1)], 1)
        memory: dict[int, object] = {}
        out: list[torch.Tensor] = []
        for t in range(x.shape[1]):
            h = x[:, t]
            for i, layer in enumerate(self.encoder):
                if isinstance(layer, MemBlock):
                    past = memory.get(i, torch.zeros_like(h))
                    memory[i] = h
                    h = layer(h, past)
                elif isinstance(layer, TPool):
                    pending = memory.setdefault(i, [])
                    pending.append(h)
                    if len(pending) < layer.stride:
                        break  # this frame is waiting for the rest of its group
                    h, memory[i] = layer(pending), []
                else:
                    h = layer(h)
            else:
                out.append(h)
        return torch.stack(out, 1)
