"""The noise covariance read on the image, and the exact variances of a group's coefficients built from it."""

import numpy as np
import pytest
import torch

from DiffDenoiseLib import covariance as covariance_module, wiener
from DiffDenoiseLib.covariance import (
    coefficient_covariance, estimate_noise_covariance, group_variance, highpass_reading, noise_shape,
)
from DiffDenoiseLib.noise import add_noise, noise_variance_curve
from DiffDenoiseLib.wiener import dct_matrix

from test_fusion import textured
from test_wiener import under_correlated_noise

BASIS = torch.kron(dct_matrix(8), dct_matrix(8)).reshape(64, 8, 8)
CUBE_BASIS = torch.kron(torch.kron(dct_matrix(4), dct_matrix(4)), dct_matrix(4))  # (64, 64): the 4x4x4 cubes' DCT


def measured_cube_group_variances(field: np.ndarray, offsets: torch.Tensor, span) -> torch.Tensor:
    """The variance of each coefficient of the 3D transform (the cubes' DCT, then a DCT across the group) of a
    group of 4x4x4 cubes at `offsets` (members, 3) from its first corner, measured by sliding that corner over the
    `span` (z, y, x) first voxels of the noise volume `field`: (members, 64)."""
    t = torch.from_numpy(field)
    sz, sy, sx = span
    cubes = torch.stack([t[dz:dz + sz, dy:dy + sy, dx:dx + sx].unfold(0, 4, 1).unfold(1, 4, 1).unfold(2, 4, 1)
                         for dz, dy, dx in offsets.tolist()])  # (members, z, y, x, 4, 4, 4)
    coefficients = torch.einsum("kv,gzyxv->zyxgk", CUBE_BASIS.double(), cubes.flatten(-3))
    across = dct_matrix(len(offsets)).double()
    return torch.einsum("ag,zyxgk->zyxak", across, coefficients).pow(2).mean(dim=(0, 1, 2))


def empirical_covariance(noise, *offset):
    """The mean of n(v) n(v + offset) over the voxels v of the stack that have both."""
    here = tuple(slice(max(0, -d), size - max(0, d)) for d, size in zip(offset, noise.shape))
    there = tuple(slice(max(0, d), size - max(0, -d)) for d, size in zip(offset, noise.shape))
    return float(np.mean(noise[here] * noise[there]))


def test_the_covariance_read_in_flat_windows_is_the_noises_in_plane_and_across_slices():
    """Pure noise, blurred in-plane by 1.2 pixels, and then mixed with the next slice's: the covariance read
    (windows' means taken out and added back) matches the noise's own at every offset checked, across
    slices too; with independent slices the offsets across slices read about 0."""
    rng = np.random.default_rng(1)
    field = add_noise(np.zeros((7, 160, 160)), "correlated", 1.2, rng, sigma=1.0)
    mixed = (field[:-1] + 0.6 * field[1:]) / np.hypot(1.0, 0.6)  # neighbouring slices share noise
    for noise, depth in ((field, 1), (mixed, 2)):
        read = estimate_noise_covariance(noise, np.zeros_like(noise), depth=depth)
        centre, reach = depth, read.shape[-1] // 2
        for dz, dy, dx in ((0, 0, 0), (0, 0, 2), (0, 3, 1), (1, 0, 0), (1, 1, 2)):
            truth = empirical_covariance(noise, dz, dy, dx)
            assert read[centre + dz, reach + dy, reach + dx] == pytest.approx(truth, abs=0.06), (dz, dy, dx)
    assert abs(estimate_noise_covariance(field, np.zeros_like(field), depth=1)[0, 8, 8]) < 0.05
    assert estimate_noise_covariance(mixed, np.zeros_like(mixed), depth=1)[0, 8, 8] > 0.35


def test_windows_of_one_value_are_not_read_as_noise_free_tissue():
    """A slice whose left half is a masked background (one value, as a CT's padding raised to air is): its windows,
    the flattest of all, would read R = 0; the noise's own covariance is read on the other half."""
    rng = np.random.default_rng(2)
    slice_ = add_noise(np.zeros((1, 128, 256)), "correlated", 1.2, rng, sigma=1.0)
    slice_[..., :128] = 0.0
    read = estimate_noise_covariance(slice_, np.zeros_like(slice_))
    reach = read.shape[-1] // 2
    assert read[0, reach, reach] == pytest.approx(empirical_covariance(slice_[..., 128:], 0, 0, 0), rel=0.15)
    assert read[0, reach, reach + 1] > 0.5 * read[0, reach, reach]


def test_a_window_holding_anatomy_the_pilot_missed_is_not_read_as_noise(monkeypatch):
    """A bright square the pilot does not show lies in a few of the windows the pilot calls flattest (its
    spread grows from left to right): read with them, R(0) comes 1.3 times the noise's and R(1) twice; windows
    reading more than OUTLIER_WINDOW_RATIO times the median are left out, and the noise's own covariance is read
    (unless asked to keep every window, as a read of the noise's shape alone does)."""
    rng = np.random.default_rng(3)
    noise = add_noise(np.zeros((1, 128, 256)), "correlated", 0.5, rng, sigma=1.0)
    noisy = noise.copy()
    noisy[0, 40:52, 8:20] += 4.0
    pilot = np.broadcast_to(1e-4 * np.arange(256.0) ** 2, noisy.shape).copy()
    read = estimate_noise_covariance(noisy, pilot)
    assert read[0, 8, 8] == pytest.approx(empirical_covariance(noise, 0, 0, 0), rel=0.08)
    assert read[0, 8, 9] == pytest.approx(empirical_covariance(noise, 0, 0, 1), rel=0.2)
    monkeypatch.setattr(covariance_module, "OUTLIER_WINDOW_RATIO", np.inf)
    every_window = estimate_noise_covariance(noisy, pilot)
    assert every_window[0, 8, 8] > 1.2 * empirical_covariance(noise, 0, 0, 0)
    assert every_window[0, 8, 9] > 1.6 * empirical_covariance(noise, 0, 0, 1)
    assert np.array_equal(estimate_noise_covariance(noisy, pilot, leave_out_outliers=False), every_window)


def test_offsets_read_within_two_standard_errors_of_zero_are_taken_as_uncorrelated(monkeypatch):
    """White noise on a 128x128 slice: without the test every offset but 0 reads sampling error (up to several
    percent of R(0)); with it most read exactly 0 (the windows half overlap, so their spread understates the
    error a little, and some sampling error passes) while R(0) stays. Correlated noise keeps its short
    offsets, where the read lies far from 0."""
    rng = np.random.default_rng(7)
    white = rng.normal(0.0, 1.0, (1, 128, 128))
    read = estimate_noise_covariance(white, np.zeros_like(white))
    monkeypatch.setattr(covariance_module, "SIGNIFICANCE", 0.0)
    raw = estimate_noise_covariance(white, np.zeros_like(white))
    off = np.ones(raw.shape, dtype=bool)
    off[0, 8, 8] = False
    assert np.count_nonzero(raw[off]) == off.sum() and np.abs(raw[off]).max() > 0.02
    assert read[0, 8, 8] == raw[0, 8, 8] and np.count_nonzero(read[off]) < 0.25 * off.sum()
    kept = read[off] != 0
    assert np.array_equal(read[off][kept], raw[off][kept])  # what is kept is the read itself
    monkeypatch.setattr(covariance_module, "SIGNIFICANCE", 2.0)
    field = add_noise(np.zeros((1, 128, 128)), "correlated", 1.2, rng, sigma=1.0)
    read = estimate_noise_covariance(field, np.zeros_like(field))
    assert (read[0, 7:10, 7:10] > 0.5).all()


def test_the_exact_group_variances_match_the_variances_of_noise_groups():
    """Four patches at fixed offsets, slid over a large field of correlated noise: the variance of each
    coefficient of their 3D transform, measured over all positions, is what group_variance computes from the
    field's covariance, within 8 % on the strong coefficients (overlapping patches share noise, so the group's
    mean coefficient carries far more than a quarter of the sum)."""
    rng = np.random.default_rng(2)
    field = add_noise(np.zeros((1, 256, 256)), "correlated", 1.2, rng, sigma=1.0)
    covariance = np.array([[[empirical_covariance(field, 0, dy, dx) for dx in range(-8, 9)] for dy in range(-8, 9)]])
    table = coefficient_covariance(covariance, BASIS, 10)
    offsets = torch.tensor([[0, 0, 0], [0, 0, 3], [0, 2, 1], [0, 6, 6]])
    transform = dct_matrix(4)
    exact = group_variance(table, offsets[None])[0]  # (4, 64)
    t = torch.from_numpy(field[0])
    patches = torch.stack([t[dy:dy + 240, dx:dx + 240].unfold(0, 8, 1).unfold(1, 8, 1) for _, dy, dx in offsets])
    coefficients = torch.einsum("kuv,gyxuv->yxgk", BASIS.double(), patches)  # (positions, 4 members, 64)
    measured = torch.einsum("ag,yxgk->yxak", transform, coefficients).pow(2).mean(dim=(0, 1))  # (4, 64)
    strong = measured > 0.1 * measured.max()
    np.testing.assert_allclose(exact[strong].numpy(), measured[strong].numpy(), rtol=0.08)
    assert exact[0, 0] > 2.5 * exact[1:, 0].mean()


def test_the_exact_variances_of_a_group_of_cubes_match_those_of_noise_cubes():
    """The volumetric filter's 4x4x4 cubes under noise correlated in the slice and independent across slices: the
    coefficient table of a 3D basis gives each coefficient of a group's transform the variance measured by sliding
    the group over a noise volume, members one or two slices apart included (the cubes of two members a slice
    apart share three slices' noise)."""
    rng = np.random.default_rng(4)
    field = add_noise(np.zeros((24, 96, 96)), "correlated", 0.5, rng, sigma=1.0)
    covariance = np.array([[[empirical_covariance(field, dz, dy, dx) for dx in range(-8, 9)] for dy in range(-8, 9)]
                           for dz in range(-3, 4)])
    table = coefficient_covariance(covariance, CUBE_BASIS.reshape(64, 4, 4, 4), 6, max_slices=2)
    assert table.shape == (5, 13, 13, 64)
    offsets = torch.tensor([[0, 0, 0], [0, 0, 2], [1, 1, 0], [2, 3, 3]])
    exact = group_variance(table, offsets[None])[0]  # (4, 64)
    measured = measured_cube_group_variances(field, offsets, (18, 88, 88))
    strong = measured > 0.1 * measured.max()
    np.testing.assert_allclose(exact[strong].numpy(), measured[strong].numpy(), rtol=0.08)
    assert exact[0, 0] > 2 * exact[1:, 0].mean(), "members that share noise: the group's mean carries more of it"


def test_the_white_noise_table_gives_overlapping_cubes_the_variance_of_the_noise_they_share():
    """Under white noise two cubes that overlap share the noise of their common voxels: the table of white noise
    (`wiener._white_table`, the shape the filters take where none is read) gives each coefficient of a group's
    transform the variance measured by sliding the group over a white noise volume, where one variance per group,
    the members taken as independent, is 1 for all; the group's mean carries more, its differences less."""
    field = np.random.default_rng(5).standard_normal((24, 96, 96))
    table = wiener._white_table(wiener.CUBE, 3, 2 * wiener.CUBE_SLICE_REACH, torch.device("cpu")).double()
    offsets = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 1, 0], [2, 3, 3], [0, 9, 9]])
    exact = group_variance(table, offsets[None])[0]  # (5, 64)
    measured = measured_cube_group_variances(field, offsets, (18, 80, 80))
    np.testing.assert_allclose(exact.numpy(), measured.numpy(), rtol=0.06)
    assert exact[0, 0] > 1.7 and exact[2:, 0].max() < 0.7  # the group's mean and differences of DC coefficients


@pytest.mark.parametrize("group, noise", [(1, "correlated"), (2, "correlated"), (5, "correlated"), (16, "correlated"),
                                          (16, "white")])
def test_the_group_variances_from_diagonal_sums_equal_the_sum_over_every_pair(group, noise, monkeypatch):
    """group_variance sums the pairs' covariances along diagonals (G^2 work), gathering only the pairs at offsets
    whose coefficients covary (under white noise, members that overlap); that equals the sum over every pair of
    members, sum_ij T(a, i) T(a, j) C_k(p_i - p_j) with T the DCT-II, for any positions, in and across slices. The
    mean row's and the other rows' mean, from the pairs' sum and the trace, are those rows' too."""
    rng = np.random.default_rng(4)
    field = add_noise(np.zeros((3, 64, 64)), "correlated", 0.8, rng, sigma=1.0)
    covariance = estimate_noise_covariance(field, np.zeros_like(field), depth=1)
    if noise == "white":
        covariance = np.zeros_like(covariance)
        covariance[(1,) + (covariance.shape[-1] // 2,) * 2] = 1.0
    table = coefficient_covariance(covariance, BASIS, 6)
    where = torch.stack([torch.from_numpy(rng.integers(0, high, (5, group))) for high in (2, 7, 7)], dim=-1)
    d = where[:, :, None] - where[:, None]  # (R, group, group, 3)
    pairs = table[d[..., 0] + 1, d[..., 1] + 6, d[..., 2] + 6]  # (R, group, group, K)
    transform = dct_matrix(group).double()
    direct = torch.einsum("ai,rijk,aj->rak", transform, pairs, transform)
    whole = group_variance(table, where)
    np.testing.assert_allclose(whole.numpy(), direct.clamp_min(1e-20).numpy(), rtol=1e-9, atol=1e-12)
    summary = torch.stack([direct[:, 0], direct[:, 1:].mean(dim=1) if group > 1 else 0 * direct[:, 0]], dim=1)
    np.testing.assert_allclose(group_variance(table, where, mean_and_deviations=True).numpy(),
                               summary.clamp_min(1e-20).numpy(), rtol=1e-9, atol=1e-12)
    monkeypatch.setattr(covariance_module, "ENTRIES_AT_ONCE", 2 * 3 * group * table.shape[-1])  # two groups at a time
    assert torch.equal(group_variance(table, where), whole)


def test_an_offset_no_flat_window_can_read_is_taken_as_uncorrelated_not_nan():
    """Two slices apart only the first and the last slice have a partner, and none of their windows is flat: that
    offset reads 0 (a NaN there once made every group reaching it garbage), the others are read as usual."""
    rng = np.random.default_rng(5)
    noisy = add_noise(np.zeros((3, 64, 64)), "correlated", 1.2, rng, sigma=1.0)
    pilot = np.zeros_like(noisy)
    pilot[0] = pilot[2] = textured(64)
    read = estimate_noise_covariance(noisy, pilot, depth=2)
    assert np.isfinite(read).all()
    assert not read[0].any() and not read[4].any()
    assert read[2, 8, 8] == pytest.approx(empirical_covariance(noisy[1:2], 0, 0, 0), rel=0.15)


def test_anatomy_in_every_window_is_read_as_noise_and_bad_input_is_named():
    """Where no window is flat (texture everywhere) the anatomy adds to the covariance read: the documented
    limit. A stack and a pilot of different shapes, or slices too small for a window, are named."""
    rng = np.random.default_rng(3)
    clean = np.stack([textured(96)] * 2)
    noisy = add_noise(clean, "gaussian", 0.02, rng)
    assert estimate_noise_covariance(noisy, clean)[0, 8, 8] > 1.5 * 0.02 ** 2
    with pytest.raises(ValueError, match="noisy stack and a pilot of one"):
        estimate_noise_covariance(noisy, clean[:1])
    with pytest.raises(ValueError, match="at least 4 voxels a side"):
        estimate_noise_covariance(np.zeros((1, 3, 40)), np.zeros((1, 3, 40)))


def test_on_the_residual_of_a_pilot_that_kept_little_noise_anatomy_is_no_longer_read_as_noise():
    """Texture everywhere, so every window holds anatomy: read in the windows R(0) is three times the noise's; on
    the residual of a pilot that lost only the fine texture and kept a little noise it is within 20 %. A pilot
    that kept half the noise leaves a residual with a quarter of its variance: the read's limit (covariance.py)."""
    clean = np.stack([textured(64)] * 5)
    noisy, pilot = under_correlated_noise(clean, np.random.default_rng(0), pilot_noise=0.01)
    noise = noisy - clean
    truth = empirical_covariance(noise, 0, 0, 0)
    assert estimate_noise_covariance(noisy, pilot, depth=1)[1, 8, 8] > 2.0 * truth
    assert estimate_noise_covariance(noisy, pilot, depth=1, residual=True)[1, 8, 8] == pytest.approx(truth, rel=0.2)
    leaky = clean + 0.5 * noise
    assert estimate_noise_covariance(noisy, leaky, depth=1, residual=True)[1, 8, 8] < 0.3 * truth


def test_the_highpass_reading_of_a_covariance_is_what_the_noise_curve_reads_of_such_noise():
    """White noise: the high-pass reads its variance; noise blurred by half a pixel: much less, and the reading
    of its (read) covariance matches what the noise curve reads on the noise itself within 5 %. Its shape is the
    covariance per unit of that reading; a covariance of no noise is taken as white."""
    rng = np.random.default_rng(5)
    white = np.zeros((1, 17, 17))
    white[0, 8, 8] = 2.0
    assert highpass_reading(white) == pytest.approx(2.0)
    field = add_noise(np.zeros((4, 160, 160)), "correlated", 0.5, rng, sigma=1.0)
    read = estimate_noise_covariance(field, np.zeros_like(field))
    curve_read = float(np.median(noise_variance_curve(field)[1]))
    assert highpass_reading(read) == pytest.approx(curve_read, rel=0.05)
    assert highpass_reading(read) < 0.5 * read[0, 8, 8]
    np.testing.assert_allclose(noise_shape(read), read / highpass_reading(read))
    assert noise_shape(np.zeros((3, 9, 9)))[1, 4, 4] == 1.0 and noise_shape(np.zeros((3, 9, 9))).sum() == 1.0
