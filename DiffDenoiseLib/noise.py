"""Noise models, variance-stabilising transforms (VSTs) and noise-level estimation.

The diffusion sampler assumes zero-mean noise of one level everywhere. Poisson,
multiplicative Gamma and Rician noise are neither, so the networks work on
`Transform.forward(y)`, where the noise is close to Gaussian with a constant std,
and the result goes back through `Transform.inverse_denoised`, which undoes the
bias that a non-linear transform puts into the mean of a denoised estimate.
All intensities here are normalised to roughly [0, 1] (see normalization.py).
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from DiffDenoiseLib.normalization import HIGH_PERCENTILE, LOW_PERCENTILE, padding_mask, raise_padding

NOISE_KINDS = ("gaussian", "poisson", "gamma", "correlated", "rician")
# `binning_noise_reading` thresholds: the ratio lies between white noise (up to 4) and correlated
# noise (14 up); the strength (noise std / intensity range) lies above what nearly clean images
# read (up to 0.040) and below the benchmark's correlated noise (0.050 up).
CORRELATED_BINNING_RATIO = 10.0
CORRELATED_MIN_STRENGTH = 0.045
# Noise as correlated as the benchmark's (kernel 1.2 px, std 0.1 of the range) reads a ratio of 40 to 140 on most
# real images, and sometimes a strength just under 0.045 (the whole 512 x 512 head CT of pydicom-data: ratio 134,
# strength 0.043). Past a ratio of 40 a weaker reading suffices: of 11,052 crops of clean images (64 to 256 px and
# whole, of the pydicom CT, MR and X-ray images at 1, 1/2 and 1/4 of their size and of axial slices of both
# volumes) 87 read above 40, all with a strength of 0.038 or less but one of flat padding, whose fine noise reads 0,
# which the first rule flags too. With that noise on the same images this missed 37 of 2,185 crops instead of 102.
CORRELATED_CLEAR_RATIO = 40.0
CORRELATED_CLEAR_MIN_STRENGTH = 0.040
# Above this ratio the noise is not white (white noise of every kind read 0.9 to 2.1 on the benchmark images, noise
# of kernel 0.5 px 2.1 to 3.1): Fast's share, fusion and the volumetric filter, which need white noise, do not run.
WHITE_NOISE_MAX_BINNING_RATIO = 2.5
# Noise of a 0.4 or 0.45 px kernel reads white by that ratio (1.4 to 1.7 and 1.7 to 2.2 on the benchmark volumes'
# held-out slabs) and still costs the volumetric filter of white noise 0.3 to 0.7 and 2.0 to 3.0 dB; kernel 0.3 (1.2)
# costs it nothing. Above this ratio strong noise has its shape read on the image by that filter and by a 2D
# model's filters (`pipeline.filters_read_the_noise_shape`), which white noise (read 1.0 to 2.4 there) leaves nearly
# as it was.
NOISE_SHAPE_MIN_BINNING_RATIO = 1.3
# Faint noise that does not read white (below the strength `reading_is_strong` asks) up to this ratio has its shape
# read by the volumetric filter too, which then makes a one-pixel 2.5D model's image (pipeline.py). On the benchmark
# volumes' held-out slabs correlated noise of a 0.5-pixel kernel at std 0.01 to 0.03 of the range read 2.8 to 9.8,
# of a 0.6-pixel kernel on the CT 6.2 to 7.3 (the filter gaining 0.08 to 3.60 dB there); noise of a 0.7 to 1.2-pixel
# kernel 11 to 86 (at std 0.01 to 0.03), where the networks' result beat the filter by up to 3.4 dB; the clean slabs
# 7.0 to 27 (their anatomy's ratio).
FAINT_NOISE_SHAPE_MAX_BINNING_RATIO = 10.0
# Noise of kernel 0.5 px (std 0.1 of the range) also reads a strength of 0.08 to 0.16 on the benchmark images, and
# with a one-pixel model Full gave 25.5 to 32.3 dB on their test crops where the models for correlated noise gave
# 27.2 to 35.2; but a rule of ratio above WHITE_NOISE_MAX_BINNING_RATIO and strength above 0.07 also flagged 975 of
# 7,628 crops (64 to 256 px, at 1, 1/2 and 1/4 of the size) of the clean pydicom CT, MR and X-ray images and of
# InVesalius slices that the rules below leave alone (the shoulder MRI's and the radiograph's full-size crops, whose
# own noise is correlated): such noise keeps the modality's model, and the log names the model for correlated noise.
# Correlated noise mixed with white noise reads a lower ratio: the benchmark's correlated noise plus white noise of
# std 0.02 (a scan's own) read 6.1 to 8.3 on the whole 2D images, strength 0.045 to 0.052, where the clean shoulder
# MRI reads 12.2 and 0.040, and at least 505 of 6,235 64-px crops of the clean images (most of them of the radiograph
# and the shoulder MRI at full size, whose own noise is correlated) read past 5 and 0.05. No rule on this reading
# tells them apart, so such a mixture keeps the modality's model, and the CLI and the panel name the model for
# correlated noise after the run (a 128 x 50 strip of the shoulder MRI read 6.6 and 0.082: 20.6 dB with the MR
# model, 26.3 with the correlated-noise model, BM3D told the spectrum 25.8).
MIN_SIDE_TO_JUDGE_NOISE = 16  # pixels: smaller slices hold too few 2x2 blocks for binning_noise_reading
TRANSFORMS = ("none", "anscombe", "log", "rician")


# ---------------------------------------------------------------- noise models

def add_noise(clean, kind: str, level: float, rng=None, sigma: float = 0.1) -> np.ndarray:
    """Synthetic noise on an image normalised to [0, 1] (2D or 3D; returns float64).

    - gaussian: additive, std `level`.
    - poisson: y = Poisson(level * x) / level (level = lambda, photons per unit intensity).
    - gamma: multiplicative, y = x * G with G ~ Gamma(shape=level, scale=1/level) (alpha = beta = level).
    - correlated: white Gaussian noise blurred in-plane (per slice) by a Gaussian kernel of std
      `level` pixels, then scaled so its std is `sigma` (default 0.1), so only the correlation changes.
    - rician: MR magnitude |x + sigma n1 + i sigma n2| with sigma = `level`.
    """
    x = np.asarray(clean, dtype=np.float64)
    rng = np.random.default_rng(rng)
    if kind == "gaussian":
        return x + rng.normal(0.0, level, x.shape)
    if kind == "poisson":
        return rng.poisson(level * np.clip(x, 0.0, None)) / float(level)
    if kind == "gamma":
        return x * rng.gamma(level, 1.0 / level, x.shape)
    if kind == "correlated":
        return x + sigma * correlated_gaussian(x.shape, level, rng)
    if kind == "rician":
        return np.hypot(x + rng.normal(0.0, level, x.shape), rng.normal(0.0, level, x.shape))
    raise ValueError(f"unknown noise kind '{kind}'; choose one of {', '.join(NOISE_KINDS)}")


def correlated_gaussian(shape, kernel_sigma: float, rng) -> np.ndarray:
    """Unit-std stationary Gaussian noise correlated in the last two axes by a Gaussian kernel.

    White noise is drawn on a margin-padded field and filtered in 'valid' mode, so the
    statistics are the same at the image border as in the centre.
    """
    kernel = gaussian_kernel(kernel_sigma)
    r = len(kernel) // 2
    padded = list(shape)
    padded[-1] += 2 * r
    padded[-2] += 2 * r
    field = rng.standard_normal(padded)
    field = correlate_valid(correlate_valid(field, kernel, -1), kernel, -2)
    return field / np.sum(kernel ** 2)  # the separable 2D kernel has sum of squares (sum k^2)^2


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1D Gaussian truncated at 4 sigma; sigma 0 is the identity."""
    if sigma <= 0:
        return np.ones(1)
    r = int(math.ceil(4.0 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def correlate_valid(array: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """1D correlation along one axis without padding (the axis shrinks by len(kernel) - 1)."""
    a = np.moveaxis(array, axis, -1)
    n = a.shape[-1] - len(kernel) + 1
    out = sum(w * a[..., i:i + n] for i, w in enumerate(kernel))
    return np.moveaxis(out, -1, axis)


# ------------------------------------------------------ variance stabilisation

class Transform:
    """Identity; the base of every VST. `inverse` is the exact algebraic inverse of `forward`;
    `inverse_denoised` maps a denoised estimate (an estimate of E[forward(y)]) back without bias."""

    name = "none"

    def __init__(self, **params):
        self.params = params

    def forward(self, y) -> np.ndarray:
        return np.array(y, dtype=np.float64)

    def inverse(self, z) -> np.ndarray:
        return np.array(z, dtype=np.float64)

    def inverse_denoised(self, z) -> np.ndarray:
        return self.inverse(z)

    def to_dict(self) -> dict:
        return {"name": self.name, **self.params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


class AnscombeTransform(Transform):
    """Poisson noise y = Poisson(lam x) / lam: z = sqrt(y + 3 / (8 lam)), i.e. Anscombe's 2 sqrt(k + 3/8)
    of the counts k = lam y divided by 2 sqrt(lam), so z stays near y's range with noise std 1 / (2 sqrt(lam)).

    Values below -3/(8 lam) (possible after normalisation) use the odd extension sign(u) sqrt(|u|).
    `inverse_denoised` is Makitalo & Foi's closed-form approximation of the exact unbiased inverse
    (IEEE TIP 2011), joined continuously to the algebraic inverse below its domain.
    """

    name = "anscombe"

    def __init__(self, lam: float):
        if not lam > 0:
            raise ValueError(f"the Anscombe transform needs lam > 0, got {lam}")
        super().__init__(lam=float(lam))
        self.shift = 3.0 / (8.0 * lam)

    def forward(self, y):
        u = np.asarray(y, dtype=np.float64) + self.shift
        return np.sign(u) * np.sqrt(np.abs(u))

    def inverse(self, z):
        z = np.asarray(z, dtype=np.float64)
        return np.sign(z) * z * z - self.shift

    def inverse_denoised(self, z):
        lam = self.params["lam"]
        d = 2.0 * math.sqrt(lam) * np.asarray(z, dtype=np.float64)  # Anscombe domain, unit noise std
        ok = d >= 2.0 * math.sqrt(3.0 / 8.0)
        safe = np.where(ok, d, 1.0)
        c = math.sqrt(1.5)
        unbiased = (0.25 * safe ** 2 + 0.25 * c / safe - 11.0 / 8.0 / safe ** 2 + 0.625 * c / safe ** 3
                    - 0.125) / lam
        return np.where(ok, unbiased, self.inverse(z))


class LogTransform(Transform):
    """Multiplicative Gamma noise y = x G, G ~ Gamma(alpha, 1/alpha): z = log(1 + y/delta) / log(1 + 1/delta).

    The `delta` offset lets y = 0 through and the odd extension (sign(y) log(1 + |y|/delta)) covers the
    slightly negative values of a normalised image; z spans about [0, 1] for y in [0, 1]. Where y >> delta
    the noise is log G, of std ~ 1/sqrt(alpha) / log(1 + 1/delta), whatever the intensity.
    `inverse_denoised` removes the mean of log G, psi(alpha) - log(alpha) ~ -1/(2 alpha), weighted by
    (x / (x + delta))^2 as the expansion of log(x G + delta) gives; without `alpha` it is `inverse`.
    """

    name = "log"

    def __init__(self, alpha: Optional[float] = None, delta: float = 0.01):
        if not delta > 0:
            raise ValueError(f"the log transform needs delta > 0, got {delta}")
        if alpha is not None and not alpha > 0:
            raise ValueError(f"the log transform needs alpha > 0, got {alpha}")
        params = {"delta": float(delta)}
        if alpha is not None:
            params["alpha"] = float(alpha)
        super().__init__(**params)
        self.delta = float(delta)
        self.norm = math.log1p(1.0 / delta)

    def forward(self, y):
        y = np.asarray(y, dtype=np.float64)
        return np.sign(y) * np.log1p(np.abs(y) / self.delta) / self.norm

    def inverse(self, z):
        z = np.asarray(z, dtype=np.float64)
        return np.sign(z) * self.delta * np.expm1(np.abs(z) * self.norm)

    def inverse_denoised(self, z):
        alpha = self.params.get("alpha")
        x = self.inverse(z)
        if alpha is None:
            return x
        w = np.asarray(z, dtype=np.float64) * self.norm
        shift = log_gamma_mean(alpha)
        positive = w > 0
        for _ in range(8):  # fixed point of log1p(x / delta) + shift (x / (x + delta))^2 = w
            weight = (np.clip(x, 0.0, None) / (np.clip(x, 0.0, None) + self.delta)) ** 2
            x = np.where(positive, self.delta * np.expm1(w - shift * weight), x)
        return x


def log_gamma_mean(alpha: float) -> float:
    """E[log G] for G ~ Gamma(alpha, 1/alpha): psi(alpha) - log(alpha)."""
    return float(torch.special.digamma(torch.tensor(float(alpha), dtype=torch.float64))) - math.log(alpha)


class RicianTransform(Transform):
    """Rician (MR magnitude) noise of Gaussian std `sigma`: a numerically built VST.

    z = sigma F(y / sigma) with F piecewise linear on a fine grid, refined (as Foi, 2011) until
    std(F(M) | nu) = 1 for every true signal nu, and shifted so that F(m) ~ m at high SNR: the noise
    becomes std `sigma` everywhere, also in the dark background where raw Rician noise is only 0.66 sigma.
    Being piecewise linear with linear ends, F and its inverse are exact inverses on all reals.
    `inverse_denoised` inverts nu -> E[F(M) | nu] (tabulated by quadrature of the Rice density), which
    removes the Rician bias (the floor of sigma sqrt(pi/2) at nu = 0) from a denoised estimate.
    """

    name = "rician"

    def __init__(self, sigma: float):
        if not sigma > 0:
            raise ValueError(f"the Rician transform needs sigma > 0, got {sigma}")
        super().__init__(sigma=float(sigma))
        self.sigma = float(sigma)

    def forward(self, y):
        m, f, _, _ = rician_tables()
        return self.sigma * interp_linear_ends(np.asarray(y, dtype=np.float64) / self.sigma, m, f)

    def inverse(self, z):
        m, f, _, _ = rician_tables()
        return self.sigma * interp_linear_ends(np.asarray(z, dtype=np.float64) / self.sigma, f, m)

    def inverse_denoised(self, z):
        _, _, nu, expected = rician_tables()
        return self.sigma * interp_linear_ends(np.asarray(z, dtype=np.float64) / self.sigma, expected, nu,
                                               low_slope=1.0, high_slope=1.0)


def interp_linear_ends(x, xp, fp, low_slope=None, high_slope=None) -> np.ndarray:
    """np.interp continued by straight lines (the end segments' slopes unless given) outside [xp0, xpN]."""
    low_slope = (fp[1] - fp[0]) / (xp[1] - xp[0]) if low_slope is None else low_slope
    high_slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2]) if high_slope is None else high_slope
    out = np.interp(x, xp, fp)
    out = np.where(x < xp[0], fp[0] + (x - xp[0]) * low_slope, out)
    return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * high_slope, out)


@functools.lru_cache(maxsize=1)
def rician_tables() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tables in units of sigma: (m knots, F(m), nu grid, E[F(M) | nu]). Built once (milliseconds)."""
    m = np.linspace(0.0, 48.0, 2401)
    nu = np.linspace(0.0, 36.0, 361)
    dm = m[1] - m[0]
    arg = torch.from_numpy(np.outer(nu, m))
    bessel = torch.special.i0e(arg).numpy()  # I0(m nu) exp(-m nu)
    density = m[None, :] * np.exp(-0.5 * (m[None, :] - nu[:, None]) ** 2) * bessel
    density /= density.sum(axis=1, keepdims=True) * dm
    f = m.copy()
    for _ in range(6):
        mean = density @ f * dm
        std = np.sqrt(np.maximum(density @ (f * f) * dm - mean ** 2, 1e-12))
        # H' = 1 / std along the curve E[F(M) | nu]; compose H with F
        h = np.concatenate([[0.0], np.cumsum(np.diff(mean) * 0.5 * (1.0 / std[1:] + 1.0 / std[:-1]))])
        f = interp_linear_ends(f, mean, h, low_slope=1.0 / std[0], high_slope=1.0 / std[-1])
    f += m[-1] - f[-1]
    expected = density @ f * dm
    return m, f, nu, expected


_TRANSFORM_CLASSES = {"none": Transform, "anscombe": AnscombeTransform, "log": LogTransform,
                      "rician": RicianTransform}


def get_transform(name: str, **params) -> Transform:
    """A VST by name: none | anscombe (lam) | log (alpha optional, delta) | rician (sigma)."""
    if name not in _TRANSFORM_CLASSES:
        raise ValueError(f"unknown transform '{name}'; choose one of {', '.join(TRANSFORMS)}")
    try:
        return _TRANSFORM_CLASSES[name](**params)
    except TypeError as error:
        raise ValueError(f"bad parameters {params} for the '{name}' transform: {error}") from None


def transform_from_dict(d: dict) -> Transform:
    """Inverse of Transform.to_dict (as stored in a model card)."""
    return get_transform(d.get("name", "none"), **{k: v for k, v in d.items() if k != "name"})


# ------------------------------------------------------- noise-level estimates

def highpass(array: np.ndarray) -> np.ndarray:
    """Immerkaer's 3x3 Laplacian difference over the last two axes, scaled so white noise keeps its std.

    It cancels constant and linear intensity, so smooth anatomy hardly leaks into the estimate.
    """
    a = np.asarray(array, dtype=np.float64)
    return (a[..., :-2, :-2] + a[..., :-2, 2:] + a[..., 2:, :-2] + a[..., 2:, 2:]
            - 2.0 * (a[..., :-2, 1:-1] + a[..., 2:, 1:-1] + a[..., 1:-1, :-2] + a[..., 1:-1, 2:])
            + 4.0 * a[..., 1:-1, 1:-1]) / 6.0


def local_mean(array: np.ndarray) -> np.ndarray:
    """3x3 in-plane mean over the same (valid) region as `highpass`."""
    a = np.asarray(array, dtype=np.float64)
    return sum(a[..., i:a.shape[-2] - 2 + i, j:a.shape[-1] - 2 + j] for i in range(3) for j in range(3)) / 9.0


def estimate_noise_sigma(array, mask=None) -> float:
    """Robust std of additive white noise: 1.4826 x median |high-pass|, per slice, median over slices.

    `mask` (same shape as the array) restricts the estimate to some voxels, pooled over slices.
    """
    a = np.asarray(array, dtype=np.float64)
    if a.ndim not in (2, 3) or min(a.shape[-2:]) < 3:
        raise ValueError(f"noise estimation needs a 2D image or 3D volume at least 3x3 in-plane, got {a.shape}")
    residual = np.abs(highpass(a))
    if mask is not None:
        inner = np.asarray(mask, dtype=bool)[..., 1:-1, 1:-1]
        if inner.sum() >= 16:
            return float(1.4826 * np.median(residual[inner]))
    if a.ndim == 2:
        return float(1.4826 * np.median(residual))
    return float(np.median(1.4826 * np.median(residual.reshape(a.shape[0], -1), axis=1)))


MEDIAN_CHI2_1 = 0.4549  # median of a chi-square variable with one degree of freedom


# (intensities, variances) of a noise variance curve, increasing intensities; evaluate with np.interp
Curve = Tuple[np.ndarray, np.ndarray]


def noise_variance_curve(array, bins: int = 20, min_count: int = 50, max_slices: int = 32) -> Curve:
    """Noise variance as a function of intensity: (intensities, variances), increasing intensities.

    Voxels are binned by their 3x3 local mean (equal-count bins); in each bin the variance
    is the median of the squared high-pass over the median of chi-square(1), which edges
    hardly move. Covers additive, Poisson, multiplicative and Rician noise alike, as long as
    the noise is white (uncorrelated between voxels); evaluate it with `np.interp` (constant
    beyond the ends). A volume is sampled at `max_slices` evenly spaced slices.
    """
    return binned_variance(*noise_samples(array, max_slices), bins, min_count)


def noise_samples(array, max_slices: int = 32, skip_constant: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(3x3 local means, high-pass values), flattened, of the voxels a noise curve reads; a volume is sampled at
    `max_slices` evenly spaced slices. With `skip_constant`, voxels whose 3x3 in-plane neighbourhood holds one
    value (a masked background) are left out: they hold no noise to read."""
    a = sample_slices(array, max_slices)
    means, samples = local_mean(a).ravel(), highpass(a).ravel()
    if not skip_constant:
        return means, samples
    read = ~constant_neighbourhoods(a).ravel()
    return means[read], samples[read]


def constant_neighbourhoods(a: np.ndarray) -> np.ndarray:
    """Where a voxel's 3x3 in-plane neighbourhood holds one value, over the (valid) region of `highpass`."""
    h, w = a.shape[-2] - 2, a.shape[-1] - 2
    centre = a[..., 1:1 + h, 1:1 + w]
    return np.logical_and.reduce([a[..., i:i + h, j:j + w] == centre for i in range(3) for j in range(3)])


FLAT_SHARE = 0.5  # a voxel counts as flat where a first estimate's high-pass stays below this many noise std


def refined_noise_curve(noisy, estimate, curve: Curve, max_slices: int = 32, min_count: int = 50) -> Curve:
    """The noise curve read again on the voxels where a first estimate of the image is flat.

    The high-pass of a voxel on an edge holds anatomy, so where most voxels of an intensity lie on
    edges (partial volume between tissues, the thin skull of a head CT) `noise_variance_curve`
    over-reads the noise: 1.7 times the variance of Gaussian noise at bone in the benchmark's head
    CT. A first estimate shows the edges without the noise: the voxels where its high-pass stays
    within FLAT_SHARE noise std (the given curve's) are binned by its local mean. Where too few
    voxels are flat for two bins, the given curve is returned.
    """
    y, e = (sample_slices(a, max_slices) for a in (noisy, estimate))
    if y.shape != e.shape:
        raise ValueError(f"the noisy image {y.shape} and its estimate {e.shape} differ in shape")
    intensity, edges = local_mean(e), np.abs(highpass(e))
    flat = edges < FLAT_SHARE * np.sqrt(np.maximum(np.interp(intensity, *curve), 0.0))
    if flat.sum() < 2 * min_count:
        return curve
    return binned_variance(intensity[flat], highpass(y)[flat], min_count=min_count)


def binning_noise_reading(array, max_slices: int = 32) -> Tuple[float, float]:
    """(ratio, strength) of the noise under 2x2 binning, from the noise curves of the image and its binned copy.

    ratio: 4 x the binned image's noise variance over the image's own. Binning averages white
    noise of any kind down by 4 (ratio about 1), but hardly averages spatially correlated
    noise, which the 3x3 high-pass of the unbinned image also misses. strength: the noise std
    the binned curve implies, as a fraction of the 0.5-99.5 percentile range. Measured on the
    benchmark images: ratio 1 to 2 under white Gaussian, Poisson, Gamma and Rician noise, 14 to
    133 under correlated noise (kernel 1.2 px, std 0.1 of the range), strength 0.046 to 0.065 (0.040 up
    on other crops and whole images of the same scans). Nearly noise-free images also read a high
    ratio (up to 30 on the Colin27 template): there the high-pass sees anatomy, whose strength stays
    low (0.0005 to 0.040 on those and on the real pydicom CT, MR and X-ray images, whole; small crops
    of the native scans, whose own noise is correlated, can read more: see CORRELATED_CLEAR_RATIO).
    """
    a = sample_slices(array, max_slices)
    if not np.isfinite(a).all():
        raise ValueError("the image has NaN or infinite voxels, so its noise cannot be read")
    if min(a.shape[-2:]) < MIN_SIDE_TO_JUDGE_NOISE:
        raise ValueError(f"the image ({' x '.join(map(str, a.shape))}) is too small to judge its noise")
    a = raise_padding(a, padding_mask(a))  # padding would stretch the range the strength is read against
    low, high = np.percentile(a, [LOW_PERCENTILE, HIGH_PERCENTILE])
    a = (a[..., : a.shape[-2] // 2 * 2, : a.shape[-1] // 2 * 2] - low) / max(high - low, 1e-12)
    binned = 0.25 * (a[..., ::2, ::2] + a[..., 1::2, ::2] + a[..., ::2, 1::2] + a[..., 1::2, 1::2])
    fine, coarse = noise_variance_curve(a), noise_variance_curve(binned)
    ratio = float(np.median(4.0 * np.interp(fine[0], *coarse) / np.maximum(fine[1], 1e-20)))
    return ratio, float(np.sqrt(np.median(4.0 * coarse[1])))


def noise_looks_correlated(array) -> bool:
    """Whether the image's noise is spatially correlated and strong enough to need a wider blind spot.

    Conservative on purpose: a miss keeps the modality's model, while a false alarm would hand
    a clean image to a network that blurs fine anatomy.
    """
    return reading_looks_correlated(binning_noise_reading(array))


def reading_looks_correlated(reading: Tuple[float, float]) -> bool:
    """`noise_looks_correlated` from a `binning_noise_reading` (ratio, strength) already taken."""
    return reading[0] > CORRELATED_BINNING_RATIO and reading_is_strong(reading)


def reading_is_strong(reading: Tuple[float, float]) -> bool:
    """Whether a `binning_noise_reading` (ratio, strength) is of noise strong enough to tell from fine anatomy."""
    ratio, strength = reading
    return strength > strength_needed(ratio)


def reading_is_faint_and_mildly_correlated(reading: Tuple[float, float]) -> bool:
    """Whether a `binning_noise_reading` (ratio, strength) is of faint noise that does not read white, with a ratio
    up to FAINT_NOISE_SHAPE_MAX_BINNING_RATIO: what a nearly clean scan's own noise of a sharp reconstruction kernel
    reads (the InVesalius head CT: 7.6, strength 0.003)."""
    ratio, _ = reading
    return (not reading_is_strong(reading)
            and WHITE_NOISE_MAX_BINNING_RATIO < ratio <= FAINT_NOISE_SHAPE_MAX_BINNING_RATIO)


def strength_needed(ratio: float) -> float:
    """The strength above which a binning reading of `ratio` counts as correlated noise: lower where the ratio is
    clearly above what clean anatomy reads."""
    return CORRELATED_CLEAR_MIN_STRENGTH if ratio > CORRELATED_CLEAR_RATIO else CORRELATED_MIN_STRENGTH


def sample_slices(a, max_slices: int) -> np.ndarray:
    """At most `max_slices` evenly spaced slices of a volume (a 2D image as it is), in float64: sampled before they
    are converted, so a large volume is not copied whole to read its noise."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[0] > max_slices:
        a = a[np.linspace(0, a.shape[0] - 1, max_slices).round().astype(int)]
    return np.asarray(a, dtype=np.float64)


def binned_variance(intensities: np.ndarray, samples: np.ndarray, bins: int = 20, min_count: int = 50,
                    centred: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Variance of Gaussian `samples` against `intensities`, robust to outliers.

    Equal-count bins of `intensities`; in each, the median of the squared samples over the
    median of chi-square(1). The samples are taken as zero-mean, or, with `centred`, as
    scattered around the bin's median. With too few samples for two bins, one global point
    is returned.
    """
    def variance(values: np.ndarray) -> float:
        centre = np.median(values) if centred else 0.0
        return float(np.median((values - centre) ** 2) / MEDIAN_CHI2_1)

    edges = np.unique(np.quantile(intensities, np.linspace(0.0, 1.0, bins + 1)))
    which = np.clip(np.searchsorted(edges, intensities, side="right") - 1, 0, max(len(edges) - 2, 0))
    xs, ys = [], []
    for b in range(max(len(edges) - 1, 0)):
        chosen = which == b
        if chosen.sum() >= min_count:
            xs.append(intensities[chosen].mean())
            ys.append(variance(samples[chosen]))
    if not xs:
        xs, ys = [float(intensities.mean())], [variance(samples)]
    return np.asarray(xs), np.asarray(ys)


def estimate_transform_params(name: str, array) -> Dict[str, float]:
    """Parameters of a VST estimated from a noisy normalised image, so users need not know them.

    anscombe: lam from the slope of local variance against local mean (var = mean / lam; the slope
    does not depend on where normalisation put the zero). log: alpha from the noise std of log y in
    bright voxels (trigamma(alpha) ~ 1/alpha + 1/(2 alpha^2)). rician: sigma from the high-pass std in
    voxels well above the noise floor, where Rician noise is Gaussian.
    """
    a = np.asarray(array, dtype=np.float64)
    if name == "none":
        return {}
    if name == "anscombe":
        xs, ys = noise_variance_curve(a)
        if len(xs) < 2 or np.ptp(xs) <= 0:
            raise ValueError("cannot estimate the Poisson level: the image has too little intensity range")
        slope = np.polyfit(xs, ys, 1)[0]
        if slope <= 0:
            raise ValueError("cannot estimate the Poisson level: the noise does not grow with intensity")
        return {"lam": float(1.0 / slope)}
    if name == "log":
        delta = LogTransform().delta
        bright = local_mean(a) > 20.0 * delta
        mask = np.zeros(a.shape, dtype=bool)
        mask[..., 1:-1, 1:-1] = bright
        s = estimate_noise_sigma(np.log(np.clip(a, delta, None)), mask=mask)
        return {"alpha": float(1.0 / max(s, 1e-6) ** 2 + 0.5)}
    if name == "rician":
        s = estimate_noise_sigma(a)
        for _ in range(3):
            mask = np.zeros(a.shape, dtype=bool)
            mask[..., 1:-1, 1:-1] = local_mean(a) > 5.0 * s
            if mask.sum() < 16:
                break
            s = estimate_noise_sigma(a, mask=mask)
        return {"sigma": float(max(s, 1e-6))}
    raise ValueError(f"unknown transform '{name}'; choose one of {', '.join(TRANSFORMS)}")
