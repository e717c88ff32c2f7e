"""Image-quality and fidelity measures: PSNR, SSIM, method noise and flat-region bias.

PSNR/SSIM need a clean reference (synthetic noise); method noise and flat-region bias
also judge real noisy images, where a denoiser must remove noise without removing edges
or shifting mean intensities (HU).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11 taps: Wang et al. (2004) and skimage's gaussian_weights=True (truncate 3.5 sigma)
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _pair(reference, estimate, mask):
    ref = np.asarray(reference, dtype=np.float64)
    est = np.asarray(estimate, dtype=np.float64)
    if ref.shape != est.shape:
        raise ValueError(f"the images differ in shape: {ref.shape} vs {est.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != ref.shape:
            raise ValueError(f"the mask's shape {mask.shape} differs from the images' {ref.shape}")
        if not mask.any():
            raise ValueError("the mask is empty")
    return ref, est, mask


def _data_range(ref: np.ndarray, data_range: Optional[float]) -> float:
    """Default: the reference's intensity range (max - min)."""
    value = float(np.ptp(ref)) if data_range is None else float(data_range)
    if not value > 0:
        raise ValueError("the data range must be positive (the reference image is constant)")
    return value


def psnr(reference, estimate, data_range: Optional[float] = None, mask=None) -> float:
    """Peak signal-to-noise ratio in dB, over the mask's voxels when given; inf for identical images."""
    ref, est, mask = _pair(reference, estimate, mask)
    peak = _data_range(ref, data_range)
    diff = (est - ref) if mask is None else (est - ref)[mask]
    mse = float(np.mean(diff * diff))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _gaussian_window() -> torch.Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    k = k / k.sum()
    return torch.outer(k, k)[None, None]


def ssim_map(reference, estimate, data_range: Optional[float] = None) -> np.ndarray:
    """Per-voxel SSIM of each slice, (n, H - 10, W - 10) for the border-free ('valid') region."""
    ref, est, _ = _pair(reference, estimate, None)
    peak = _data_range(ref, data_range)
    if ref.ndim not in (2, 3):
        raise ValueError(f"SSIM takes 2D images or 3D volumes, got {ref.ndim}D")
    if min(ref.shape[-2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs slices of at least {2 * SSIM_RADIUS + 1} pixels a side, got {ref.shape}")
    x = torch.from_numpy(ref.reshape((-1, 1) + ref.shape[-2:]))
    y = torch.from_numpy(est.reshape((-1, 1) + est.shape[-2:]))
    window = _gaussian_window()
    filt = lambda a: torch.nn.functional.conv2d(a, window)  # noqa: E731
    ux, uy = filt(x), filt(y)
    vx = filt(x * x) - ux * ux
    vy = filt(y * y) - uy * uy
    vxy = filt(x * y) - ux * uy
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s[:, 0].numpy()


def ssim(reference, estimate, data_range: Optional[float] = None, mask=None) -> float:
    """Structural similarity (Wang et al. 2004: 11-tap Gaussian window, sigma 1.5, population covariance).

    Volumes are scored slice by slice (in-plane windows) and averaged; the image border of
    5 pixels is left out, as skimage does. With a mask, only masked voxels of that region count.
    """
    ref, est, mask = _pair(reference, estimate, mask)
    s = ssim_map(ref, est, data_range)
    if mask is None:
        return float(s.mean())
    inner = mask.reshape((-1,) + mask.shape[-2:])[:, SSIM_RADIUS:-SSIM_RADIUS, SSIM_RADIUS:-SSIM_RADIUS]
    if not inner.any():
        raise ValueError(f"the mask has no voxel farther than {SSIM_RADIUS} pixels from the image border")
    return float(s[inner].mean())


def gradient_magnitude(image) -> np.ndarray:
    """In-plane gradient magnitude (central differences over the last two axes)."""
    a = np.asarray(image, dtype=np.float64)
    gy, gx = np.gradient(a, axis=(-2, -1))
    return np.hypot(gx, gy)


def method_noise_stats(noisy, denoised, clean=None, noise_std=None) -> dict:
    """Statistics of the method noise, noisy - denoised, which should look like pure noise.

    `edge_correlation` is the correlation between |method noise| and the gradient magnitude of
    the clean image when given (otherwise of the denoised image): near 0 when only noise was
    removed, larger when edges and texture were removed with it. Signal-dependent noise (Poisson,
    Gamma) is larger where the image is bright, and bright tissue has edges of its own, so there even
    removing exactly the noise correlates with them (+0.14 or -0.16 on the benchmark's Gamma 100); with
    `noise_std` (the noise's standard deviation, a number or one per voxel) the method noise is divided
    by it first, which brings that back to 0.
    """
    y, d, _ = _pair(noisy, denoised, None)
    residual = y - d
    edges = gradient_magnitude(d if clean is None else _pair(noisy, clean, None)[1])
    scale = np.broadcast_to(np.asarray(1.0 if noise_std is None else noise_std, dtype=np.float64), residual.shape)
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("the noise's standard deviation must be positive and finite at every voxel")
    magnitude = (np.abs(residual) / scale).ravel()
    edges = edges.ravel()
    if magnitude.std() == 0 or edges.std() == 0:
        correlation = 0.0
    else:
        correlation = float(np.corrcoef(magnitude, edges)[0, 1])
    return {"std": float(residual.std()), "mean": float(residual.mean()), "edge_correlation": correlation,
            "edge_reference": "denoised" if clean is None else "clean"}


def flat_region_bias(reference, denoised, mask) -> float:
    """Mean of denoised - reference inside a mask (e.g. mean HU shift in a tissue patch)."""
    ref, est, mask = _pair(reference, denoised, mask)
    if mask is None:
        raise ValueError("flat_region_bias needs a mask of the flat region")
    return float(np.mean(est[mask] - ref[mask]))
