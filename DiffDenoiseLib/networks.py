"""The three networks: blind-spot network (stage 1), conditional UNet (stage 2), student (stage 3b).

Tensors are (batch, channels, height, width), float32, intensities roughly in [0, 1].
With `context_slices = k` an input stack has 2k + 1 slices, the one being denoised in
channel k. Every network accepts any height and width and returns the input's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from DiffDenoiseLib.settings import JsonSettings

# AP-BSN's refinement (BlindSpotNet.estimate), measured on the benchmark's correlated noise: 16 % noisy
# pixels beat 30 %; a shuffle by 2 in the passes beat none by 0.1 to 1.0 dB; 8 passes beat 4 by
# 0.05 dB at most, for twice the time.
REFINE_PASSES = 4
REFINE_NOISY_FRACTION = 0.16


@dataclass
class NetworkConfig(JsonSettings):
    """Architecture hyper-parameters shared by the three networks (stored in the model card)."""

    KIND = "network"

    context_slices: int = 0  # k: 2k+1 input slices
    blind_spot_radius: int = 0  # 0 hides one pixel; r hides a (2r+1)^2 square
    bsn_width: int = 48
    bsn_depth: int = 5  # dilated layers per branch
    unet_base: int = 32
    unet_mults: Tuple[int, ...] = (1, 2, 2)
    student_width: int = 32

    def __post_init__(self):
        self.unet_mults = tuple(int(m) for m in self.unet_mults)
        if self.context_slices < 0 or self.blind_spot_radius < 0 or self.bsn_depth < 0:
            raise ValueError("context_slices, blind_spot_radius and bsn_depth must be 0 or more")
        if min(self.bsn_width, self.unet_base, self.student_width) < 1 or not self.unet_mults:
            raise ValueError("network widths must be positive and unet_mults must name at least one level")

    @property
    def in_slices(self) -> int:
        return 2 * self.context_slices + 1


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --- Stage 1: blind-spot network ------------------------------------------------------------


class _MaskedConv2d(nn.Conv2d):
    """Convolution blind to the centre tap of one input channel (the slice being denoised)."""

    def __init__(self, in_ch: int, out_ch: int, size: int, hidden_channel: int):
        super().__init__(in_ch, out_ch, size, padding=size // 2)
        mask = torch.ones_like(self.weight)
        mask[:, hidden_channel, size // 2, size // 2] = 0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class _BlindBranch(nn.Module):
    """Masked size x size convolution followed by residual convolutions dilated by size // 2 + 1.

    Every path back to the input adds a multiple of the dilation to one masked-kernel
    offset, whose coordinates are smaller than the dilation; the sum is zero only for
    the masked centre tap, so the branch never sees its own pixel of the centre slice.
    Zero padding keeps that true at the borders (reflection would mirror the pixel back).
    """

    def __init__(self, in_ch: int, width: int, depth: int, size: int, hidden_channel: int):
        super().__init__()
        dilation = size // 2 + 1
        self.head = _MaskedConv2d(in_ch, width, size, hidden_channel)
        self.layers = nn.ModuleList(
            nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.head(x))
        for conv in self.layers:
            h = h + F.relu(conv(h))
        return h


class BlindSpotNet(nn.Module):
    """Estimate of the centre slice from everything except its own pixel(s) (DBSN-style, two branches).

    Input (B, 2k+1, H, W), output (B, 1, H, W). Only the centre slice is hidden; the
    neighbouring slices are independent noisy observations and are seen in full. With
    `blind_spot_radius = r > 0` the image is pixel-shuffle downsampled by r + 1, so
    every pixel within r of the predicted one lands in another sub-image and stays hidden,
    which handles spatially correlated noise. `forward` is that training geometry;
    denoising uses `estimate`.
    """

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.config = cfg
        k, width = cfg.context_slices, cfg.bsn_width
        self.branch3 = _BlindBranch(cfg.in_slices, width, cfg.bsn_depth, 3, k)
        self.branch5 = _BlindBranch(cfg.in_slices, width, cfg.bsn_depth, 5, k)
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * width, width, 1), nn.ReLU(),
            nn.Conv2d(width, width, 1), nn.ReLU(),
            nn.Conv2d(width, 1, 1))

    def _blind(self, y: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.branch3(y), self.branch5(y)], dim=1))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self._shuffled(y, self.config.blind_spot_radius + 1)

    def estimate(self, y: torch.Tensor) -> torch.Tensor:
        """The blind-spot estimate for denoising: `forward`, or for a wide blind spot AP-BSN's inference.

        Shuffling by the trained factor cuts the image into coarse sub-images and loses fine
        structure. Following Lee et al. 2022 (AP-BSN), the estimate averages the shuffles by 2 up
        to one less than the trained factor (by 2 alone for a radius of 1), which let a little
        correlated noise through but keep the structure, then refines: each of REFINE_PASSES
        passes gives a random REFINE_NOISY_FRACTION of the centre slice's pixels back their
        noisy values, the rest the first estimate, and shuffles by 2.
        On the benchmark's correlated noise this gains 1.4 to 2.8 dB over `forward`. The masks
        come from a fixed seed, so the same input gives the same estimate.
        """
        s = self.config.blind_spot_radius + 1
        if s == 1:
            return self._blind(y)
        k = self.config.context_slices
        first = torch.stack([self._shuffled(y, f) for f in range(2, max(s, 3))]).mean(dim=0)
        centre = y[:, k:k + 1]
        generator = torch.Generator(device=y.device).manual_seed(0)
        total = torch.zeros_like(first)
        for _ in range(REFINE_PASSES):
            noisy = torch.rand(centre.shape, generator=generator, device=y.device) < REFINE_NOISY_FRACTION
            mixed = torch.cat([y[:, :k], torch.where(noisy, centre, first), y[:, k + 1:]], dim=1)
            total += self._shuffled(mixed, 2)
        return total / REFINE_PASSES

    def _shuffled(self, y: torch.Tensor, s: int) -> torch.Tensor:
        """The blind estimate with the image pixel-shuffle downsampled by s (1: not at all)."""
        if s == 1:
            return self._blind(y)
        b, c, height, width = y.shape
        y = F.pad(y, (0, (-width) % s, 0, (-height) % s))
        h, w = y.shape[-2] // s, y.shape[-1] // s
        sub = F.pixel_unshuffle(y, s).view(b, c, s * s, h, w).transpose(1, 2).reshape(b * s * s, c, h, w)
        out = self._blind(sub).view(b, s * s, h, w)
        return F.pixel_shuffle(out, s)[:, :, :height, :width]


# The views of the self-ensemble in the order they join: the mirror image, the half turn and its
# mirror, then the quarter turns and theirs.
DIHEDRAL_VIEWS = ((0, False), (0, True), (2, False), (2, True), (1, False), (1, True), (3, False), (3, True))
VIEW_COUNTS = (1, 2, 4, 8)  # the self-ensembles that take every view's turn and its mirror alike


def dihedral_mean(fn, views: int):
    """`fn` averaged over the first `views` of the eight flips and quarter turns of its input (self-ensemble).

    Each view is turned back before averaging. A network's errors differ between an image and
    its mirror or turn, so their mean is better than any one: on the benchmark's white noise the
    blind-spot estimates of 2, 4 and 8 views beat the single pass by 0.09, 0.17 and 0.19 dB on
    average (4 views: 0.03 to 0.34 dB), for 2, 4 and 8 times the network's cost.
    """
    if views not in VIEW_COUNTS:
        raise ValueError(f"the self-ensemble takes 1, 2, 4 or 8 views of the image, not {views}")
    if views == 1:
        return fn

    def averaged(y: torch.Tensor) -> torch.Tensor:
        total = None
        for turns, mirror in DIHEDRAL_VIEWS[:views]:
            view = torch.rot90(y, turns, (-2, -1))
            out = fn(view.flip(-1) if mirror else view)
            out = torch.rot90(out.flip(-1) if mirror else out, -turns, (-2, -1))
            total = out if total is None else total + out
        return total / views

    return averaged


# --- UNet body shared by the conditional UNet and the student ---------------------------------


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim), dim even (Vaswani et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class _ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, the time embedding added in between, with a skip connection."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: Optional[int]):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(time_dim, out_ch) if time_dim else None
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time is not None:
            h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNetBody(nn.Module):
    """UNet with one residual block per level and an optional time embedding; one output channel.

    Pads the input (replicating the border) to a multiple of 2**(levels - 1) and crops
    back. The last convolution starts at zero, so an untrained body outputs exactly 0.
    """

    def __init__(self, in_ch: int, base: int, mults: Tuple[int, ...], time_dim: Optional[int] = None):
        super().__init__()
        widths = [base * m for m in mults]
        self.conv_in = nn.Conv2d(in_ch, base, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch = base
        for i, w in enumerate(widths):
            self.down.append(_ResBlock(ch, w, time_dim))
            ch = w
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid = _ResBlock(ch, ch, time_dim)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(widths))):
            self.up.append(_ResBlock(ch + widths[i], widths[i], time_dim))
            ch = widths[i]
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        multiple = 2 ** (len(self.down) - 1)
        x = F.pad(x, (0, (-width) % multiple, 0, (-height) % multiple), mode="replicate")
        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for i, block in enumerate(self.up):
            if i > 0:
                h = self.upsample[i - 1](F.interpolate(h, scale_factor=2, mode="nearest"))
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))[:, :, :height, :width]


# --- Stage 2: conditional diffusion model -----------------------------------------------------


class ConditionalUNet(nn.Module):
    """Diffusion model: (x_t (B,1,H,W), t (B,) long, cond (B,1+2k,H,W)) -> (B,1,H,W).

    `cond` is the BSN estimate of the centre slice followed by the 2k neighbouring noisy
    slices; never the noisy centre slice itself, or the model learns to copy it.
    """

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.config = cfg
        self.embed_dim = 2 * ((cfg.unet_base + 1) // 2)
        time_dim = 4 * cfg.unet_base
        self.time_mlp = nn.Sequential(nn.Linear(self.embed_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.body = UNetBody(1 + cfg.in_slices, cfg.unet_base, cfg.unet_mults, time_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.embed_dim))
        return self.body(torch.cat([x_t, cond], dim=1), emb)


# --- Stage 3b: distilled student ---------------------------------------------------------------


class StudentNet(nn.Module):
    """One-pass denoiser (B, 2k+1, H, W) -> (B, 1, H, W): the centre slice plus a learned correction.

    Learning the residual lets a small two-level UNet reach the SRDS teacher quickly;
    untrained, it returns the centre slice unchanged.
    """

    def __init__(self, cfg: NetworkConfig):
        super().__init__()
        self.config = cfg
        self.body = UNetBody(cfg.in_slices, cfg.student_width, (1, 2))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        k = self.config.context_slices
        return y[:, k:k + 1] + self.body(y)
