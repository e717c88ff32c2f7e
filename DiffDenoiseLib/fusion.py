"""Observation fusion: give each voxel's own noisy value back to a blind-spot estimate.

The blind-spot network, and the diffusion stage built on it, estimate a voxel from
its surroundings only, so they throw away the one observation that is most about the
voxel: its own noisy value y. Treating the estimate m as a prior with error variance v
and y as a measurement with noise variance s, the best linear combination is

    x = (v * y + s * m) / (v + s)

(the posterior mean of Laine et al. 2019, "High-quality self-supervised deep image
denoising"). Both variances come from the image itself: s from the noise variance
curve at the estimate's intensity (noise.py), and v from the mean of (y - m)^2 over a
window around the voxel, less s. The window leaves the voxel out, so a voxel's own
noise does not decide its own weight. Where the estimate is good (flat tissue) the
result keeps it; where it missed structure (edges, fine detail) it leans on y.

The window's mean of (y - m)^2 is itself noisy (a standard error of about s * sqrt(2 / N)
for N neighbours), and keeping only its positive excess over s hands some noise back
even where the estimate is perfect. That costs most when the estimate is far better than
y (strong noise): 0.9 dB on the benchmark's head CT under Gaussian noise of 25/255. So v
is the excess over s plus a margin of a few standard errors, and the margin is chosen per
image by Stein's unbiased risk estimate of the result's error (Stein 1981), which needs no
clean image: sum over voxels of (w (y - m))^2 - s + 2 s (1 - w), w the estimate's weight.

The student (Fast mode) did see y, so neither formula applies to it; what it can still get
wrong is how much of y to keep. On an image unlike its training data at weak noise it
smooths too much (the shoulder MRI at Gaussian 6/255: 1.5 dB below the same output with a
third of y put back). `keep_observation_share` gives back the share a of y - m, in
x = m + a (y - m), that minimises Stein's estimate for an estimate that saw y:
sum (x - y)^2 - s + 2 s dx/dy, its divergence dm/dy measured by a Monte-Carlo probe
(Ramani, Blu and Unser 2008): m once more on y + eps b, b random signs.

The fused result is then the pilot of the collaborative Wiener filter (wiener.py).

All of this assumes white noise. Spatially correlated noise breaks it twice: y's noise
is shared with the neighbours the estimate came from, and it is smooth, so the high-pass
sees little of it and s comes out far too small; fusion would hand the noise back.
`looks_correlated` notices this from the residual y - m, and `fuse_unless_correlated`
then returns the estimate as it is.

Faint noise that does not read white is where that leaves the networks' result unchecked, and where it is
worst: a nearly clean image reads anatomy's binning ratio, not white noise's, and a network trained on noisier
scans smooths its fine anatomy away (Colin27's held-out slabs with noise of std 0.003-0.005: Fast 4 to 10 dB
below the input it was given, Full 11 to 18). What the result took is then visible in what it
removed: noise alone does not follow the image's edges, anatomy does (`removed_follows_edges`, the benchmark's
method-noise statistic read against the result's own edges). Where it does, the share of y - m that Stein's
estimate prefers, up to all of it (`GIVE_BACK_SHARES`), goes back. The high-pass curve reads correlated noise too
low, which makes that share larger: it keeps more of the input than is best, which costs most where the noise is
moderate and widely correlated (on the 2D held-out strips about a quarter of the rows the check reached lost
more than 0.5 dB to the networks' result, up to 3 dB in Fast and 4.3 in Full; none on the volumes' slabs; see
`choose_observation_share`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from DiffDenoiseLib.metrics import method_noise_stats
from DiffDenoiseLib.noise import (MIN_SIDE_TO_JUDGE_NOISE, WHITE_NOISE_MAX_BINNING_RATIO, Curve, binned_variance,
                                  binning_noise_reading, noise_variance_curve, sample_slices)

FUSION_WINDOW = 9  # measured on the benchmark images: 7 to 15 are within 0.1 dB, 3 loses up to 0.5 dB
# Residual variance over the white-noise estimate beyond which the noise counts as spatially
# correlated. A blind estimate's residual holds the noise plus the estimate's own error: measured
# on the benchmark images, 0.8 to 1.1 times the white-noise level under white noise and 4 to 80
# times under correlated noise (Gaussian kernels of 1.2 pixels).
CORRELATED_NOISE_RATIO = 3.0
# Candidate margins, in standard errors of the window's mean residual power, by which that power
# must exceed the noise variance before the estimate counts as having missed something.
FUSION_MARGINS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
# Candidate shares of the observation given back to an estimate that saw it (the student's).
OBSERVATION_SHARES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)
# The Monte-Carlo probe's step, in noise standard deviations: small enough for a derivative,
# large enough to stay clear of float32 rounding in the network.
PROBE_STEP = 0.01
# Correlation of |y - m| with the result's gradient magnitude (metrics.method_noise_stats) above which, under faint
# noise that does not read white, the networks count as having taken anatomy with the noise. Measured on the
# benchmark images' held-out slabs and regions (noise of kernels 0 to 1.2 pixels, std 0.003 to 0.03): 0.1 to 0.55
# where their result lay well below the input; where it beat the input, giving back lost up to 4.2 dB from 0.05 up
# (a head CT's bone edges, the networks' own errors under stronger widely correlated noise), 3.6 from 0.1 up, the
# result then still at or above the input.
ANATOMY_EDGE_CORRELATION = 0.1
# Shares of y - m that may go back where the networks took anatomy: any, up to the input itself.
GIVE_BACK_SHARES = tuple(round(0.05 * i, 2) for i in range(21))


def looks_correlated(noisy: np.ndarray, estimate: np.ndarray, white: Optional[Curve] = None,
                     max_slices: int = 32) -> bool:
    """Whether the noise around `estimate` looks spatially correlated, so fusion must not run.

    `white` is the high-pass curve of the whole image (computed from `noisy` when None). The
    test: the residual's variance, binned by the estimate's intensity and taken around each
    bin's median (a bias is not noise), against the white-noise curve.
    """
    y = sample_slices(noisy, max_slices)
    m = sample_slices(estimate, max_slices)
    white = noise_variance_curve(noisy) if white is None else white
    residual = binned_variance(m.ravel(), (y - m).ravel(), centred=True)
    ratio = float(np.median(np.interp(white[0], *residual) / np.maximum(white[1], 1e-20)))
    return ratio > CORRELATED_NOISE_RATIO


def _window_mean_without_centre(a: np.ndarray, window: int) -> np.ndarray:
    """Mean over the window x window neighbourhood of each pixel of a 2D array, the pixel excluded."""
    r = window // 2
    padded = np.pad(a, r, mode="reflect" if min(a.shape) > r else "edge")
    sums = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    box = sums[window:, window:] - sums[:-window, window:] - sums[window:, :-window] + sums[:-window, :-window]
    return (box - a) / (window * window - 1)


def _slices_with_noise(y: np.ndarray, m: np.ndarray, curve: Curve, window: int):
    """(y, m, noise variance s, window mean of (y - m)^2 without the centre) per 2D slice, one at a time,
    so a volume needs no volume-sized temporaries."""
    xs, ys = curve
    for i in np.ndindex(y.shape[:-2]):
        y2, m2 = y[i].astype(np.float64), m[i].astype(np.float64)
        yield i, y2, m2, np.interp(m2, xs, ys), _window_mean_without_centre((y2 - m2) ** 2, window)


def _variance_floor(curve: Curve) -> float:
    """The least error variance an estimate is given, so its weight s / (v + s) stays below 1 by a hair."""
    return 1e-3 * float(np.mean(curve[1])) + 1e-12


def _estimate_weight(s: np.ndarray, power: np.ndarray, margin: float, window: int, floor: float) -> np.ndarray:
    """s / (v + s), v the window's residual power beyond the noise and `margin` standard errors of it."""
    v = np.maximum(power - (1.0 + margin * np.sqrt(2.0 / (window * window - 1))) * s, floor)
    return s / (v + s)


def choose_margin(noisy: np.ndarray, estimate: np.ndarray, curve: Curve, window: int = FUSION_WINDOW,
                  margins: Sequence[float] = FUSION_MARGINS) -> float:
    """The margin of `margins` whose fused result has the least Stein's unbiased risk estimate.

    The estimate treats m as independent of the voxel's own noise: exact for the blind-spot
    estimate, close for SRDS built on it.
    """
    y, m = np.asarray(noisy), np.asarray(estimate)
    floor = _variance_floor(curve)
    risks = np.zeros(len(margins))
    for _, y2, m2, s, power in _slices_with_noise(y, m, curve, window):
        for j, margin in enumerate(margins):
            w = _estimate_weight(s, power, margin, window, floor)
            risks[j] += float(np.sum((w * (y2 - m2)) ** 2 + 2.0 * s * (1.0 - w) - s))
    return float(margins[int(np.argmin(risks))])


def fuse_with_observation(
    noisy: np.ndarray,
    estimate: np.ndarray,
    curve: Optional[Curve] = None,
    window: int = FUSION_WINDOW,
    margin: Optional[float] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """(fused, weight of the estimate) for (n, H, W) or (H, W) slices; the inputs are not modified.

    `curve` is the noise variance curve of the whole image (estimated from `noisy` when
    None); pass it when fusing a subset of an image's slices. `margin` (None: chosen by
    `choose_margin`) is in standard errors of the window's mean residual power.
    """
    y = np.asarray(noisy)
    m = np.asarray(estimate)
    if y.shape != m.shape or y.ndim not in (2, 3):
        raise ValueError(f"fusion needs a noisy image and an estimate of one 2D or 3D shape, got {y.shape} and {m.shape}")
    if window < 3 or window % 2 == 0:
        raise ValueError(f"the fusion window must be odd and at least 3, got {window}")
    curve = curve if curve is not None else noise_variance_curve(y)
    margin = choose_margin(y, m, curve, window) if margin is None else float(margin)
    floor = _variance_floor(curve)
    fused, weight = np.empty(y.shape), np.empty(y.shape)
    for i, y2, m2, s, power in _slices_with_noise(y, m, curve, window):
        weight[i] = _estimate_weight(s, power, margin, window, floor)
        fused[i] = m2 + (1.0 - weight[i]) * (y2 - m2)
    return fused, weight


def fuse_unless_correlated(noisy: np.ndarray, estimate: np.ndarray, white: Optional[Curve] = None,
                           noise_reading: Optional[Callable[[], Tuple[float, float]]] = None
                           ) -> Tuple[np.ndarray, Optional[np.ndarray], bool]:
    """(result, weight of the estimate or None, whether the noise looks correlated).

    Fusion with the white-noise curve (of `noisy` when `white` is None), unless the noise looks
    spatially correlated, by its residual (`looks_correlated`) or by the binning reading that keeps Fast's share
    and the volumetric filter from it (`noise_is_white_enough_for_the_share`): then the estimate comes back
    unchanged and the weight is None. The residual alone read noise of a 0.5-pixel kernel as white on the
    benchmark's five test crops: Full fused it with the high-pass curve, which sees only part of it, and its
    Wiener filter kept the noise (24.3 to 25.4 dB against Fast's 25.7 to 32.1). Slices too small for the binning
    reading (`noise.MIN_SIDE_TO_JUDGE_NOISE`) are judged by the residual alone. `white` and `noise_reading` (the
    binning reading, taken when first asked) may come from the whole image that `noisy` is a range of slices of,
    so that a range judges its noise as the whole image's run does.
    """
    white = noise_variance_curve(noisy) if white is None else white
    judged = min(np.shape(noisy)[-2:]) >= MIN_SIDE_TO_JUDGE_NOISE
    reading = noise_reading or (lambda: binning_noise_reading(noisy))
    if (judged and not reading_is_white_enough_for_the_share(reading())) or looks_correlated(noisy, estimate, white):
        return np.asarray(estimate), None, True
    fused, weight = fuse_with_observation(noisy, estimate, curve=white)
    return fused, weight, False


def probe_step(curve: Curve) -> float:
    """eps of the Monte-Carlo divergence probe for an image whose noise variance curve is `curve`."""
    return PROBE_STEP * float(np.sqrt(max(np.mean(curve[1]), 1e-20)))


def choose_observation_share(noisy: np.ndarray, estimate: np.ndarray, probed: Optional[np.ndarray],
                             probe: Optional[np.ndarray], step: Optional[float], curve: Curve,
                             shares: Sequence[float] = OBSERVATION_SHARES) -> float:
    """The share a of `shares` whose x = m + a (y - m) has the least Stein's unbiased risk estimate.

    m = `estimate` saw y; `probed` is the same estimator's output on y + `step` * `probe`
    (`probe` random signs), which measures D = sum s dm/dy. With R = sum (m - y)^2 and
    S = sum s: risk(a) = (1 - a)^2 R - S + 2 (a S + (1 - a) D). `probed` None stands for an
    estimate blind to each voxel's own value (a blind-spot estimate, SRDS built on it): D = 0.

    s comes from `curve`, the noise's high-pass reading (noise.noise_variance_curve), which sees white noise whole but
    only part of correlated noise's variance (0.78 of it for a 0.4-pixel kernel, 0.43 for 0.5, 0.07 for 0.7, 0.007 for
    1.0): the share then comes out too large. The binned image's curve sees the whole variance up to a 0.7-pixel
    kernel, but under faint noise it counts anatomy too (up to 70 times the variance at std 0.003 on held-out regions);
    scaling s by the binning ratio helped Fast under noise of a 0.4 to 0.5-pixel kernel by 0.1 to 0.6 dB on average on
    held-out 2D strips, but white noise reads ratios up to 2 on the benchmark images: neither is used.
    """
    y, m = np.asarray(noisy, dtype=np.float64), np.asarray(estimate, dtype=np.float64)
    s = np.interp(m, *curve)
    divergence = 0.0 if probed is None else float(np.sum(probe * s * (np.asarray(probed, np.float64) - m))) / step
    residual, variance = float(np.sum((m - y) ** 2)), float(np.sum(s))
    risks = [(1 - a) ** 2 * residual - variance + 2 * (a * variance + (1 - a) * divergence) for a in shares]
    return float(shares[int(np.argmin(risks))])


def removed_follows_edges(noisy: np.ndarray, estimate: np.ndarray, max_slices: int = 32) -> float:
    """Correlation of |y - m| with the gradient magnitude of m, over up to `max_slices` evenly spaced slices: near 0
    where m took only noise, positive where it took edges and fine anatomy with it."""
    return method_noise_stats(sample_slices(noisy, max_slices), sample_slices(estimate, max_slices))["edge_correlation"]


def noise_is_white_enough_for_the_share(noisy: np.ndarray) -> bool:
    """Whether `noisy`'s noise is white enough for `choose_observation_share` and fusion (see
    noise.WHITE_NOISE_MAX_BINNING_RATIO). The image is read, not the student's residual, which holds the structure
    the student smoothed away and so would read as correlated noise."""
    return reading_is_white_enough_for_the_share(binning_noise_reading(noisy))


def reading_is_white_enough_for_the_share(reading: Tuple[float, float]) -> bool:
    """`noise_is_white_enough_for_the_share` from a `binning_noise_reading` (ratio, strength) already taken."""
    return reading[0] <= WHITE_NOISE_MAX_BINNING_RATIO
