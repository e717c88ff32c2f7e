"""The covariance of spatially correlated noise, and from it the exact noise variance of a group's coefficients.

Under correlated noise (a reconstruction kernel's, or the benchmark's blurred noise) neighbouring voxels share
their noise, so each coefficient of a patch's 2D DCT carries a noise variance of its own (low frequencies
much more), and two patches that lie close share part of theirs: across a group of matched patches the noise
then neither is white nor averages out. Mäkinen, Azzari and Foi (2020, "Collaborative filtering of correlated
noise: exact transform-domain variance for improved shrinkage and patch matching") compute the variance of
every coefficient of a group's 3D transform exactly from the noise's covariance R and the patches' positions:

    cov(coefficient k of the patch at p, coefficient k of the patch at q) = C_k(p - q),
    C_k(d) = sum over voxels u, v of B_k(u) B_k(v) R(d + v - u)         (B_k: the k-th 2D DCT basis patch)
    var(coefficient (a, k) of the group) = sum over members i, j of T(a, i) T(a, j) C_k(p_i - p_j)

with T the 1D transform across the group (exact: a coefficient of the group mixes only the members' k-th
coefficients). For the DCT-II across the group, T(a, i) T(a, j) is half the sum of two cosines, of a (i - j) and
of a (i + j + 1), so each variance needs only the sums of C_k(p_i - p_j) along the diagonals and anti-diagonals
of the group's pairs (G^2 work per coefficient instead of G^3 for the sum as written).

R is not known: `estimate_noise_covariance` reads it on the image itself, in the windows where a pilot (a
network's result) is flattest, whose variation is then mostly noise; each window's mean is taken out first
(which lowers every R(d) alike, by a few percent of R(0) for short correlations: that level is read on the
ring of offsets REACH voxels away, where the noise is taken as uncorrelated, and taken out). Offsets across
slices are read the same way, so noise correlated between slices (thin CT slices) is covered too. Where
the read is within SIGNIFICANCE standard errors of 0 (the error from the spread between the windows), the
offset is taken as uncorrelated: on a 128x128 slice the error is about 5 % of R(0), and the far offsets'
sampling error, read as covariance, made the exact variances wrong (measured on the benchmark's 2D images
with correlated noise: +0.13 dB on the shoulder MRI, +0.03 on the chest X-ray, +0.01 on the 693 CT;
the volumes' reads, from 16 slices' windows, change by under 0.01 dB). The noise is taken as stationary.
Where no window is flat (a crop of the brain alone) anatomy adds to R, and the filters then smooth more.

With `residual`, R is read on y - pilot instead, in the same windows: what the pilot got right of the anatomy no
longer counts as noise, but what it kept of the noise goes missing from R. So it suits a pilot that kept little
of the noise at the voxels it is read against. Measured (the benchmark's correlated noise, R(0) read against the
noise's own): a 2.5D network's result (a wide blind spot, with the neighbouring slices' independent noise to go
on) read +16 % on Colin27's brain crop, whose windows read +56 %, and +9 % on the InVesalius CT (windows -2 %);
the 2D network's result and the hard-thresholding estimate kept so much of the noise that their residuals read
30 to 40 % low on the three 2D images (windows within 6 %), so those are read in the windows.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from DiffDenoiseLib.noise import constant_neighbourhoods, highpass

# What the read costs the 2D filters (held-out regions of the benchmark's images, correlated 1.2, fresh draws, Fast's
# inputs, 2026-12-05): told the true covariance they gained +0.46 dB on the 693 CT's strips, +0.22 on the shoulder
# MRI's, +0.20 on the chest X-ray's and +0.82 on Colin27's tissue-filled crops (+0.12 and +0.04 on two of the
# InVesalius CT's): a 128-voxel strip offers 3 to 9 flat windows, and R(0) read 0.84 to 1.8 times the true one (3.1
# on a brain crop), its shape off too where R(0) came right (+0.2 dB there). Windows of 24 gained +0.24, +0.17 and
# +0.08 on Colin27, the 693 CT and the X-ray and lost 0.05 and 0.04 on the InVesalius CT and the MRI; 48 lost
# 0.15 to 1.3 on three and gained 0.03 on two; reading 35 % of the windows, windows a quarter side apart instead
# of half (-0.31 on the 693 CT, the others within 0.07), a plane taken out of each window instead of its mean
# (Colin27 +0.08, the others within 0.04), or keeping every read (SIGNIFICANCE 0) or fewer (3), did not help.
# Taking the pilot's own covariance in each window out of y's (anatomy left in the windows cancels, the noise the
# pilot kept goes missing once) for the hard thresholding, the 2D result as that pilot: R(0) read 0.80 to 1.40
# times the noise's own instead of 0.93 to 1.94 on those regions, +0.27 dB on Colin27's, +0.18 on the 693 CT's,
# +0.04 on the X-ray's, 0.00 and -0.02 on the MRI's and the InVesalius CT's; but on the benchmark's own 2D test
# crops (a quick run) +0.03, +0.05 and -0.10 dB (693 CT, MRI, X-ray), and with fresh draws on the X-ray's crop the
# windows read R(0) within 3 % and the true covariance gained 0.02 dB there: not shipped. A robust level (the
# median of second differences 3 or 4 voxels apart over the whole image) read 1.1 to 2.2 times R(0); clipping
# R's spectrum at 0 raised R(0) and lost 0.1 to 0.2 dB.
WINDOW = 32  # side of the windows the covariance is read in
FLATTEST_SHARE = 0.2  # of the windows (by the pilot's std within them) that are read
REACH = 8  # in-plane offsets beyond this many voxels are taken as uncorrelated
# A window whose read R(0) exceeds OUTLIER_WINDOW_RATIO times the median of the chosen windows' holds anatomy the
# pilot smoothed over (or missed) and is not read. On the three 2D images' test crops and 12 held-out strips (fresh
# draws, BM3D's result as the pilot, the 2D correlated-noise filters' final image, 2026-12-06): kernel 0.5 +0.34 dB
# on average (three strips, half background or anatomy, where R(0) had read up to 1.6 times the noise's, +0.41 to
# +2.89; every other region, the test crops too, 0.00); kernel 1.2 +0.004 (-0.12 to +0.09), whose windows' own
# reads spread more; the volumes' residual reads (16 slices' windows; the volumetric filter under kernel 0.5 and
# Gaussian 6/255, test slab and 2 to 3 held-out slabs of each) left out no window.
# Windows read for the noise's shape only (`noise_shape`: its level is the noise curve's, which follows Poisson and
# Gamma noise's intensity, so their windows differ in level by right) are all kept: leaving out there cost the
# shoulder MRI's Gamma 100 0.11 dB in a quick run. Measured before it: the median of the windows' reads at each
# offset +0.14 dB on average under kernel 0.5 (-0.12 to +1.77); reading 40 % of the windows, with or without
# leaving out, -0.6 and -0.3.
OUTLIER_WINDOW_RATIO = 1.3
SIGNIFICANCE = 2.0  # standard errors a read must lie from 0 to be kept
ENTRIES_AT_ONCE = 1 << 23  # `group_variance`'s pairs on their lines held at once (two int64 indices each: 128 MiB)


def estimate_noise_covariance(noisy: np.ndarray, pilot: np.ndarray, depth: int = 0,
                              residual: bool = False, leave_out_outliers: bool = True) -> np.ndarray:
    """The noise covariance R (2 * depth + 1, 2 * reach + 1, 2 * reach + 1) of the stack `noisy` (n, H, W), at
    offsets of up to `depth` slices and reach = REACH voxels (a quarter of the window on smaller images), read
    in the WINDOW-sided windows (half overlapping) of every slice where `pilot` (same shape) varies least (the
    FLATTEST_SHARE of them, leaving out windows that reach a 3x3 neighbourhood of one value: a masked background),
    each window's mean taken out, and with `leave_out_outliers` leaving out those whose read variance exceeds
    OUTLIER_WINDOW_RATIO times the median of theirs (anatomy the pilot smoothed over; not for a shape read under
    noise whose level follows the intensity, where windows differ in level by right). Offsets to slices beyond the
    stack are read on the slices that have them (as 0, uncorrelated, when none of their windows is among the
    flattest); R(0) is the noise variance, and R(-d) = R(d) (which `group_variance` relies on). An offset whose read
    lies within SIGNIFICANCE standard errors of 0 (from the spread of the windows' own reads) is 0. With `residual`
    the windows read `noisy` - `pilot` (see above)."""
    y, m = (torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in (noisy, pilot))
    if y.ndim != 3 or y.shape != m.shape:
        raise ValueError(f"the noise covariance needs a noisy stack and a pilot of one (n, H, W) shape, got "
                         f"{tuple(y.shape)} and {tuple(m.shape)}")
    if residual:
        y = y - m
    n, h, w = y.shape
    side = min(WINDOW, h, w)
    reach = min(REACH, side // 4)  # a small image's windows are small: fewer offsets are read
    if reach < 1:
        raise ValueError(f"the noise covariance needs slices of at least 4 voxels a side, got {h} x {w}")
    step = max(1, side // 2)

    def windows(a: torch.Tensor) -> torch.Tensor:  # (n, windows, side, side)
        return a.unfold(1, side, step).unfold(2, side, step).reshape(n, -1, side, side)

    yw, spread = windows(y), windows(m).std(dim=(2, 3))  # views: only the windows read are copied
    # a masked background (or a CT's padding raised to air) holds no noise: windows reaching into it are not read
    constant = F.pad(torch.from_numpy(constant_neighbourhoods(y.numpy())).double(), (1, 1, 1, 1))
    constant = windows(constant).amax(dim=(2, 3)) > 0
    if not constant.all():  # windows all of one value: read as they are
        spread = spread.masked_fill(constant, float("inf"))
    readable = int((~constant).sum()) or spread.numel()
    flattest = torch.argsort(spread.reshape(-1))[:max(1, int(FLATTEST_SHARE * readable))]
    def centred(a: torch.Tensor) -> torch.Tensor:
        return a - a.mean(dim=(1, 2), keepdim=True)

    # a window holding anatomy the pilot smoothed over reads far more than the noise: left out
    if leave_out_outliers:
        variance = centred(yw.reshape(-1, side, side)[flattest]).pow(2).mean(dim=(1, 2))
        flattest = flattest[variance <= OUTLIER_WINDOW_RATIO * variance.median()]
    chosen = torch.zeros(spread.numel(), dtype=torch.bool)
    chosen[flattest] = True
    chosen = chosen.reshape(spread.shape)  # (n, windows)

    covariance = np.zeros((2 * depth + 1, 2 * reach + 1, 2 * reach + 1))
    error = np.zeros_like(covariance)  # the standard error of each read, from the spread between windows
    for dz in range(-depth, depth + 1):
        first, last = max(0, -dz), min(n, n - dz)  # slices that have a neighbour dz away
        if first >= last:
            continue
        keep = chosen[first:last]
        if not keep.any():  # no flat window in the slices that have this neighbour: taken as uncorrelated
            continue
        a, b = centred(yw[first:last][keep]), centred(yw[first + dz:last + dz][keep])  # the same windows dz apart
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                products = (a[:, max(0, -dy):side - max(0, dy), max(0, -dx):side - max(0, dx)]
                            * b[:, max(0, dy):side - max(0, -dy), max(0, dx):side - max(0, -dx)])
                per_window = products.mean(dim=(1, 2))
                covariance[dz + depth, dy + reach, dx + reach] = float(per_window.mean())
                if per_window.numel() > 1:
                    error[dz + depth, dy + reach, dx + reach] = float(per_window.std() / math.sqrt(per_window.numel()))
    # Taking out a window's mean lowers every R(d) by about the same amount (sum(R) / side^2 for correlations much
    # shorter than the window), and a slow trend of the anatomy in the window raises every R(d) alike: both are
    # taken out by reading that level on the outermost ring of offsets, where the noise is taken as uncorrelated.
    ring = np.ones((2 * reach + 1, 2 * reach + 1), dtype=bool)
    ring[1:-1, 1:-1] = False
    covariance = covariance - covariance[:, ring].mean(axis=1)[:, None, None]
    covariance = (covariance + covariance[::-1, ::-1, ::-1]) / 2  # R(-d) = R(d); the windows' edges read them apart
    error = (error + error[::-1, ::-1, ::-1]) / 2
    return np.where(np.abs(covariance) < SIGNIFICANCE * error, 0.0, covariance)


def highpass_reading(covariance: np.ndarray) -> float:
    """The variance `noise.highpass` reads (and so a noise curve) of noise with the covariance R (as
    `estimate_noise_covariance` returns it; the slice's own offsets): sum over offsets s of A(s) R(s), A the
    high-pass kernel's autocorrelation. R(0) for white noise; less for correlated noise, whose low frequencies the
    high-pass misses."""
    delta = np.zeros((5, 5))
    delta[2, 2] = 1.0
    kernel = highpass(delta)  # the 3x3 kernel (it is symmetric)
    autocorrelation = sum(kernel[i, j] * np.pad(kernel, ((2 - i, i), (2 - j, j))) for i in range(3) for j in range(3))
    depth, reach = covariance.shape[0] // 2, covariance.shape[-1] // 2
    plane = np.pad(covariance[depth], max(0, 2 - reach))  # offsets beyond those read are uncorrelated
    centre = plane.shape[-1] // 2
    return float(np.sum(autocorrelation * plane[centre - 2:centre + 3, centre - 2:centre + 3]))


def noise_shape(covariance: np.ndarray) -> np.ndarray:
    """The covariance R per unit of its `highpass_reading`: the noise's shape, which a noise curve's variance at an
    intensity scales to that intensity's covariance (white noise: 1 at offset 0). Where no noise is read, white."""
    reading = highpass_reading(covariance)
    if reading > 0:
        return covariance / reading
    white = np.zeros_like(covariance)
    white[tuple(size // 2 for size in covariance.shape)] = 1.0
    return white


def coefficient_covariance(covariance: np.ndarray, basis: torch.Tensor, max_offset: int,
                           max_slices: Optional[int] = None) -> torch.Tensor:
    """C_k(dz, dy, dx): the covariance of the k-th coefficient of two blocks offset by (dz, dy, dx), for
    in-plane offsets of up to `max_offset` and, with `max_slices`, offsets of up to that many slices (else as many
    as `covariance` reads); `basis` (K, P, P) holds the 2D transform's basis patches as rows, or (K, D, P, P) a 3D
    transform's basis blocks D slices deep (the volumetric filter's cubes). Returns
    (2 * depth + 1, 2 * max_offset + 1, 2 * max_offset + 1, K), float64, contiguous, so that
    `group_variance` reads all coefficients of an offset as one row."""
    b = basis.double()[:, None] if basis.ndim == 4 else basis.double()[:, None, None]  # (K, 1, D, P, P)
    deep, patch = b.shape[2], b.shape[-1]
    r = torch.from_numpy(covariance).double()
    depth, reach = r.shape[0] // 2, r.shape[-1] // 2
    slices = depth if max_slices is None else max_slices
    pad = max_offset + patch - 1 - reach
    r = F.pad(r, (pad, pad, pad, pad)) if pad > 0 else r[:, -pad:r.shape[1] + pad, -pad:r.shape[2] + pad]
    pad_z = slices + deep - 1 - depth  # offsets beyond those read are taken as uncorrelated
    r = F.pad(r, (0, 0, 0, 0, pad_z, pad_z)) if pad_z > 0 else r[-pad_z:r.shape[0] + pad_z]
    # each basis block's autocorrelation A_k(s) = sum_u B_k(u) B_k(u + s), then C_k(d) = sum_s A_k(s) R(d + s)
    autocorrelation = F.conv3d(b.transpose(0, 1), b, padding=(deep - 1, patch - 1, patch - 1),
                               groups=basis.shape[0]).transpose(0, 1)
    return F.conv3d(r[None, None], autocorrelation)[0].permute(1, 2, 3, 0).contiguous()  # (depth, side, side, K)


def group_variance(table: torch.Tensor, where: torch.Tensor, mean_and_deviations: bool = False) -> torch.Tensor:
    """The noise variance of every coefficient of each group's 3D transform (the DCT-II across the group), (R,
    group, K), from the coefficient covariance `table` (as `coefficient_covariance` returns, on the device,
    covering every offset between two members) and the groups' (slice, y, x) positions `where` (R, group, 3).

    C_k is symmetric, so only the pairs i > j are read: their sums along each diagonal (i - j = m) and anti-diagonal
    (i + j = s) give var(a, k) = C_k(0) + c_a sum_m D_m cos(pi a m / G) + c_a sum_s S_s cos(pi a (s + 1) / G),
    with c_a = 1 / G for a = 0 and 2 / G otherwise (the module docstring says why). Each line's sum is one bag of
    `embedding_bag` over the rows of the offsets whose coefficients covary (white noise's: members that overlap;
    the other pairs read a row of zeros): the rows are summed as they are read, never gathered one per pair. Against
    gathering each pair's row and adding it onto its lines, or counting the pairs at each offset (2026-12-08, every
    filter route's calls): 3 times faster on the groups of 128 members under 2.5D correlated noise, 1.5 to 3.5 on
    the 2D filters' under correlated noise, 1.2 to 2 elsewhere.

    With `mean_and_deviations`, (R, 2, K): the mean row's variance C_k(0) + 2 / G sum_{i > j} C_k(p_i - p_j) and
    the other rows' mean, (G C_k(0) - the mean row's) / (G - 1) (0 for a group of one), as the rows' variances sum
    to the members' own (the DCT is orthonormal): one line, not 3 G, which is all the filters on the groups' own
    axes use."""
    group, k, device = where.shape[1], table.shape[-1], where.device
    rows = table.reshape(-1, k)  # (offsets, K): a view
    covary = rows.abs().amax(-1) > 0
    slots = torch.cumsum(covary, 0) * covary  # each offset's row among those that covary, from 1; else 0
    covarying_rows = torch.cat([rows.new_zeros(1, k), rows[covary]])  # row 0: the offsets that do not covary
    depth, side = table.shape[0] // 2, table.shape[1]
    centre = (depth * side + side // 2) * side + side // 2  # the table's row of offset 0
    at_zero = rows[centre]  # C_k(0): the members' own variances
    i, j = torch.tril_indices(group, group, -1, device=device)
    if mean_and_deviations:  # every pair on one line, weighed 2 / G
        later, earlier = i, j  # each entry's two members (i > j)
        starts, cosines = i.new_zeros(1), torch.full((1, 1), 2.0 / group, dtype=rows.dtype, device=device)
    else:  # each pair on its diagonal (line i - j) and its anti-diagonal (line G + i + j), listed line by line
        lines = torch.cat([i - j, group + i + j])
        order = torch.argsort(lines, stable=True)
        later, earlier = torch.cat([i, i])[order], torch.cat([j, j])[order]
        starts = torch.searchsorted(lines[order], torch.arange(3 * group, device=device))  # each line's first
        a = torch.arange(group, dtype=torch.float64, device=device)[:, None]
        c = torch.where(a == 0, 1.0, 2.0).to(torch.float64) / group
        cosines = torch.cat([c * torch.cos(math.pi * a * torch.arange(group, device=device) / group),
                             c * torch.cos(math.pi * a * (torch.arange(2 * group, device=device) + 1) / group)],
                            dim=1).to(rows.dtype)  # (G, 3 G)
    entries = len(later)  # a group's pairs, once on each of their lines
    variances = []
    for part in torch.split(where, max(1, ENTRIES_AT_ONCE // max(1, entries, len(starts) * k))):  # bounded memory
        # a pair's row of the table: the flat offset between its members (the table's index is linear in the offset)
        flat = (part[..., 0] * side + part[..., 1]) * side + part[..., 2]  # (R, group)
        index = flat[:, later] - flat[:, earlier] + centre  # (R, entries)
        bags = (torch.arange(len(part), device=device)[:, None] * entries + starts).reshape(-1)
        sums = F.embedding_bag(slots[index].reshape(-1), covarying_rows, bags, mode="sum")
        variances.append(at_zero + cosines @ sums.reshape(len(part), len(starts), k))
    variance = torch.cat(variances) if len(variances) > 1 else variances[0]
    if mean_and_deviations:
        variance = torch.cat([variance, (group * at_zero - variance) / max(1, group - 1)], dim=1)
    return variance.clamp_min(1e-20)
