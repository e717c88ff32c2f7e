"""The supervised oracle: the student's architecture trained on clean/noisy pairs (the upper bound).

It learns from the image's training regions only (other slices of the volume, or the
strips around a 2D image's test crop), with fresh noise of the test condition drawn at
every step, so it sees the noise model exactly and never the test crop. Its quality is
bounded by the short CPU budget as much as by the method: the report states the steps.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from DiffDenoiseLib.networks import NetworkConfig, StudentNet

from benchmarks.suite import Noise


def patches(regions: List[np.ndarray], size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random size x size patches (with flips and turns) from the regions large enough to hold one."""
    usable = [r for r in regions if min(r.shape) >= size]
    weights = np.array([r.size for r in usable], dtype=np.float64)
    out = np.empty((count, size, size))
    for b in range(count):
        r = usable[int(rng.choice(len(usable), p=weights / weights.sum()))]
        y, x = (int(rng.integers(0, s - size + 1)) for s in r.shape)
        out[b] = np.rot90(r[y:y + size, x:x + size], int(rng.integers(0, 4)))
    return out


def train_oracle(regions: List[np.ndarray], noise: Noise, steps: int, batch: int = 8, patch: int = 48,
                 lr: float = 1e-3, seed: int = 0) -> StudentNet:
    """StudentNet (default width) fitted with MSE to clean patches from their noisy versions."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    patch = min([patch] + [min(r.shape) for r in regions])
    net = StudentNet(NetworkConfig())
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for step in range(steps):
        clean = patches(regions, patch, batch, rng)
        noisy = noise.apply(clean, rng)
        for group in optimizer.param_groups:  # cosine decay to a tenth
            group["lr"] = lr * (0.1 + 0.45 * (1 + np.cos(np.pi * step / steps)))
        x = torch.from_numpy(noisy[:, None].astype(np.float32))
        y = torch.from_numpy(clean[:, None].astype(np.float32))
        loss = F.mse_loss(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


def apply_oracle(net: StudentNet, noisy: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(np.asarray(noisy, np.float32)[None, None]))[0, 0].double().numpy()
