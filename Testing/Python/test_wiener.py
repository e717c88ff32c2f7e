"""The collaborative Wiener filter: what it gives back, what it keeps, where its groups come from."""

import numpy as np
import pytest
import torch

from DiffDenoiseLib import datasets, wiener
from DiffDenoiseLib.covariance import coefficient_covariance
from DiffDenoiseLib.fusion import fuse_with_observation
from DiffDenoiseLib.noise import (
    NOISE_SHAPE_MIN_BINNING_RATIO, add_noise, binning_noise_reading, correlated_gaussian, noise_variance_curve,
)
from DiffDenoiseLib.progress import CancelToken, Cancelled

from test_fusion import mse, phantom, textured

WHITE = (np.array([0.0, 1.0]), np.full(2, 0.03 ** 2))  # a noise curve: variance 0.03^2 at every intensity


def gaussian_blur(a, sigma):
    """Separable Gaussian blur with edge padding: a pilot that kept the anatomy and lost the fine texture."""
    r = int(3 * sigma)
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g /= g.sum()
    padded = np.pad(a, r, mode="edge")
    rows = sum(g[i] * padded[i:i + a.shape[0]] for i in range(2 * r + 1))
    return sum(g[i] * rows[:, i:i + a.shape[1]] for i in range(2 * r + 1))


def under_correlated_noise(clean, rng, pilot_noise):
    """(noisy, pilot) of the stack `clean` under in-plane correlated noise (std 0.05, kernel 1.2 pixels): a pilot
    that lost the fine texture (blurred by 1 pixel) and kept a little noise of its own (std `pilot_noise`)."""
    noisy = add_noise(clean, "correlated", 1.2, rng, sigma=0.05)
    pilot = np.stack([gaussian_blur(s, 1.0) for s in clean]) + add_noise(np.zeros_like(clean), "correlated", 1.2, rng,
                                                                         sigma=pilot_noise)
    return noisy, pilot


def test_the_filter_gives_back_the_texture_a_smooth_pilot_lost_and_beats_pixel_fusion():
    """The pilot lost the fine texture; pixel-wise fusion can only trade it against noise voxel by voxel, the
    filter keeps the texture's coefficients of y and removes the noise of the others."""
    clean = textured()
    noisy = add_noise(clean, "gaussian", 0.03, np.random.default_rng(7))
    pilot = gaussian_blur(clean, 1.5)
    before = noisy.copy(), pilot.copy()
    filtered = wiener.collaborative_wiener(noisy, pilot, WHITE)
    assert np.array_equal(noisy, before[0]) and np.array_equal(pilot, before[1]), "inputs must not change"
    fused, _ = fuse_with_observation(noisy, pilot, curve=WHITE)
    assert mse(filtered, clean) < 0.6 * mse(fused, clean) < 0.4 * mse(pilot, clean)
    assert mse(filtered, clean) < 0.2 * mse(noisy, clean)


def test_a_perfect_pilot_comes_back_and_a_second_pass_takes_the_first_as_its_pilot():
    flat = np.full((40, 40), 0.4)
    assert np.allclose(wiener.collaborative_wiener(flat, flat, WHITE), flat, atol=1e-6)
    clean = phantom(64)
    # noise-free image, noise-free pilot: every gain is ~1 where there is signal, so the image comes back
    assert np.allclose(wiener.collaborative_wiener(clean, clean, (WHITE[0], np.full(2, 1e-12))), clean, atol=1e-5)
    noisy = add_noise(clean, "gaussian", 0.03, np.random.default_rng(8))
    pilot = gaussian_blur(noisy, 1.0)
    once = wiener.collaborative_wiener(noisy, pilot, WHITE)
    twice = wiener.collaborative_wiener(noisy, pilot, WHITE, passes=2)
    np.testing.assert_allclose(twice, wiener.collaborative_wiener(noisy, once.astype(np.float32), WHITE), atol=1e-6)
    assert mse(twice, clean) < mse(once, clean) < mse(pilot, clean)


def test_block_matching_groups_patches_that_look_alike_in_the_pilot():
    """In a pilot that repeats every 5 voxels each reference patch has exact copies, and its group is
    itself (first) and such copies, in its own slice and the neighbouring one."""
    pattern = np.tile(np.random.default_rng(9).random((5, 5)), (8, 8))
    pilot = torch.from_numpy(np.stack([pattern, np.roll(pattern, (2, 3), axis=(0, 1))]).astype(np.float32))
    ref_y, ref_x = wiener._reference_positions(40), wiener._reference_positions(40)
    groups = wiener._match(pilot, 0, ref_y, ref_x)
    positions = 40 - wiener.PATCH + 1
    assert groups.shape == (len(ref_y) * len(ref_x), wiener.GROUP, 3)
    k, y, x = groups.unbind(-1)
    ry = ref_y[:, None].expand(-1, len(ref_x)).reshape(-1, 1)
    rx = ref_x[None, :].expand(len(ref_y), -1).reshape(-1, 1)
    assert torch.equal(k[:, 0], torch.zeros(len(groups), dtype=k.dtype))
    assert torch.equal(y[:, :1], ry) and torch.equal(x[:, :1], rx), "a reference patch leads its own group"
    # away from the borders the window holds more copies than a group takes: every member is one, at the same
    # phase of the pattern (the second slice is shifted by (2, 3))
    inside = ((ry >= 8) & (ry <= positions - 9) & (rx >= 8) & (rx <= positions - 9))[:, 0]
    k, y, x, ry, rx = k[inside], y[inside], x[inside], ry[inside], rx[inside]
    assert len(ry) >= 9
    assert torch.all((y - 2 * k - ry) % 5 == 0) and torch.all((x - 3 * k - rx) % 5 == 0)
    assert torch.all(torch.abs(y - ry) <= wiener.SEARCH_RADIUS) and torch.all(torch.abs(x - rx) <= wiener.SEARCH_RADIUS)
    assert bool((k == 1).any()), "the neighbouring slice offers copies too"


def test_block_matching_finds_the_nearest_blocks_whatever_its_tiles():
    """The groups are the `group` blocks nearest to each reference in squared distance, summed voxel by voxel
    (float64) over every block within the search radius that stays inside the slab, the reference first; for
    patches and for cubes, near the borders and away, and the same whether a matrix product takes one reference
    of a row, a few or all of them."""
    pilot = torch.from_numpy(np.random.default_rng(4).random((5, 37, 41)).astype(np.float32))
    voxels = pilot.double().numpy()
    ref_y, ref_x = wiener._reference_positions(37), wiener._reference_positions(41)
    for patch, depth, centre, radius in ((wiener.PATCH, 1, 2, wiener.SEARCH_RADIUS), (wiener.CUBE, wiener.CUBE, 1, 5)):
        found = wiener._match(pilot, centre, ref_y, ref_x, group=10, radius=radius, patch=patch, depth=depth)
        assert len(set(map(tuple, found[:, 1:].reshape(-1, 3).tolist()))) > 50  # distances chose them
        for tile in (1, 3, 1000):
            tiled = wiener._match(pilot, centre, ref_y, ref_x, group=10, radius=radius, patch=patch, depth=depth,
                                  refs_per_tile=tile)
            assert torch.equal(tiled, found), (patch, tile)
        for i, (y0, x0) in enumerate((y, x) for y in ref_y.tolist() for x in ref_x.tolist()):
            reference = voxels[centre:centre + depth, y0:y0 + patch, x0:x0 + patch]
            candidates = sorted((np.sum((voxels[k:k + depth, y:y + patch, x:x + patch] - reference) ** 2), k, y, x)
                                for k in range(5 - depth + 1)
                                for y in range(max(0, y0 - radius), min(37 - patch, y0 + radius) + 1)
                                for x in range(max(0, x0 - radius), min(41 - patch, x0 + radius) + 1))
            assert [tuple(c[1:]) for c in candidates[:10]] == [tuple(m) for m in found[i].tolist()], (patch, i)


def test_the_wiener_step_leaves_a_references_near_copies_in_its_own_slice_out_of_its_group():
    """On a smooth pilot the nearest patches are the reference shifted by a voxel, which share most of its noise:
    with near_shift 1 none of the group (but the reference) lies within one voxel of it in its own slice, while
    the neighbouring slice's patch at the same place may still come."""
    ramp = np.add.outer(np.linspace(0, 1, 40), np.linspace(0, 0.5, 40))
    pilot = torch.from_numpy(np.stack([ramp, ramp]).astype(np.float32))
    ref_y, ref_x = wiener._reference_positions(40), wiener._reference_positions(40)
    ry = ref_y[:, None].expand(-1, len(ref_x)).reshape(-1, 1)
    rx = ref_x[None, :].expand(len(ref_y), -1).reshape(-1, 1)
    for near_shift, expected in ((0, True), (1, False)):
        k, y, x = wiener._match(pilot, 0, ref_y, ref_x, near_shift=near_shift).unbind(-1)
        close = (k[:, 1:] == 0) & ((y - ry).abs()[:, 1:] <= 1) & ((x - rx).abs()[:, 1:] <= 1)
        assert bool(close.any()) is expected, near_shift
        assert torch.equal(y[:, :1], ry) and torch.equal(x[:, :1], rx)
    assert bool(((k == 1) & (y == ry) & (x == rx)).any())


def test_neighbouring_slices_give_a_volume_more_alike_patches_to_average():
    """Five slices of one anatomy with independent noise: groups that reach two slices each way beat groups of
    the centre slice alone, and filtering some slices gives exactly those slices of filtering all."""
    clean = np.stack([textured(64)] * 5)
    noisy = add_noise(clean, "gaussian", 0.05, np.random.default_rng(10))
    curve = (WHITE[0], np.full(2, 0.05 ** 2))
    pilot = np.stack([gaussian_blur(s, 1.0) for s in noisy])
    alone = wiener.collaborative_wiener(noisy, pilot, curve)[2]
    together = wiener.collaborative_wiener(noisy, pilot, curve, context=2)
    assert mse(together[2], clean[2]) < 0.8 * mse(alone, clean[2])
    part = wiener.collaborative_wiener(noisy, pilot, curve, context=2, indices=[1, 2])
    np.testing.assert_allclose(part, together[1:3], atol=1e-6)


def scan(size):
    """A textured object on a flat background, as in a scan: the background holds the flat windows the noise
    covariance is read in (covariance.py)."""
    image = np.full((size, size), 0.2)
    inner = slice(size // 4, size - size // 4)
    image[inner, inner] = textured(size - 2 * (size // 4))
    return image


def test_under_correlated_noise_each_coefficient_gets_its_exact_noise_and_neighbours_help():
    """In-plane correlated noise, independent between slices, and a pilot that lost the texture and kept some
    of that noise. Taken as white (the high-pass curve misses most of it), the noise comes back; with each
    coefficient's exact noise variance and groups reaching two slices each way, the filter beats the pilot
    clearly; the centre slice alone, whose nearby patches share their noise, does less well."""
    clean = np.stack([scan(64)] * 5)
    noisy, pilot = under_correlated_noise(clean, np.random.default_rng(12), pilot_noise=0.02)
    curve = noise_variance_curve(noisy)
    taken_as_white = wiener.collaborative_wiener(noisy, pilot, curve, context=2, indices=[2])[0]
    exact = wiener.collaborative_wiener(noisy, pilot, curve, context=2, indices=[2], correlated_noise=True)[0]
    alone = wiener.collaborative_wiener(noisy, pilot, curve, indices=[2], correlated_noise=True)[0]
    assert mse(exact, clean[2]) < 0.6 * mse(pilot[2], clean[2]) < 0.5 * mse(taken_as_white, clean[2])
    assert mse(alone, clean[2]) > 1.15 * mse(exact, clean[2])


def test_under_correlated_noise_each_step_searches_its_own_window(monkeypatch):
    """Hard thresholding, the Wiener step within a slice (groups of nearly its whole window) and the Wiener step
    across slices each match with their own group size, search radius and reference spacing; the coefficient
    table reaches every offset the widest window makes, so the variances of groups that span it are read."""
    searched = []
    match = wiener._match

    def spy(pilot, centre, ref_y, ref_x, group, radius, *args, **kwargs):
        searched.append((group, radius, int(ref_x[1] - ref_x[0])))
        return match(pilot, centre, ref_y, ref_x, group, radius, *args, **kwargs)

    monkeypatch.setattr(wiener, "_match", spy)
    clean = np.stack([scan(64)] * 3)
    noisy, pilot = under_correlated_noise(clean, np.random.default_rng(3), pilot_noise=0.02)
    curve = noise_variance_curve(noisy)
    steps = {  # name: (the step, the group, search radius and reference spacing it must match with)
        "hard": (lambda: wiener.collaborative_hard_threshold(noisy[1], pilot[1], curve, correlated_noise=True),
                 (wiener.CORRELATED_HARD_GROUP, wiener.CORRELATED_HARD_SEARCH_RADIUS, wiener.CORRELATED_STEP)),
        "wiener in the slice": (lambda: wiener.collaborative_wiener(noisy[1], pilot[1], curve, correlated_noise=True),
                                (wiener.CORRELATED_WIENER_GROUP, wiener.CORRELATED_WIENER_RADIUS_2D,
                                 wiener.CORRELATED_WIENER_STEP_2D)),
        "wiener across slices": (lambda: wiener.collaborative_wiener(noisy, pilot, curve, context=1, indices=[1],
                                                                     correlated_noise=True)[0],
                                 (wiener.CORRELATED_WIENER_GROUP_ACROSS_SLICES,
                                  wiener.CORRELATED_WIENER_RADIUS_ACROSS_SLICES, wiener.CORRELATED_STEP)),
    }
    for name, (run, expected) in steps.items():
        searched.clear()
        result = run()
        assert set(searched) == {expected}, name
        assert np.isfinite(result).all() and mse(result, clean[1]) < mse(noisy[1], clean[1]), name
    widest = max(wiener.CORRELATED_HARD_SEARCH_RADIUS, wiener.CORRELATED_WIENER_RADIUS_2D,
                 wiener.CORRELATED_WIENER_RADIUS_ACROSS_SLICES)
    table = wiener._coefficient_table(noisy, pilot, None, 1)
    assert table.shape[1] == table.shape[2] >= 4 * widest + 1


def test_where_no_window_is_flat_the_covariance_read_on_the_pilots_residual_filters_better():
    """Texture everywhere: read in the flattest windows the anatomy counts as noise and the filter smooths the
    texture away; read on y - pilot (a pilot that lost the fine texture and kept a little noise) it does not."""
    clean = np.stack([textured(64)] * 5)
    noisy, pilot = under_correlated_noise(clean, np.random.default_rng(0), pilot_noise=0.01)
    curve = noise_variance_curve(noisy)
    options = dict(context=2, indices=[2], correlated_noise=True)
    in_windows = wiener.collaborative_wiener(noisy, pilot, curve, **options)[0]
    on_residual = wiener.collaborative_wiener(noisy, pilot, curve, covariance_on_residual=True, **options)[0]
    assert mse(on_residual, clean[2]) < 0.7 * mse(in_windows, clean[2])


def test_hard_thresholding_with_exact_variances_removes_correlated_noise_and_the_wiener_step_adds():
    """The high-pass curve misses most of correlated noise, so hard thresholding at its level keeps nearly all of
    it; with each coefficient's exact variance (the covariance read on the flat background) the estimate, matched
    on y, loses most of it, and the Wiener step guided by that estimate alone removes a little more."""
    rng = np.random.default_rng(18)
    clean = scan(96)
    noisy = add_noise(clean, "correlated", 1.2, rng, sigma=0.05)
    pilot = gaussian_blur(clean, 1.0) + add_noise(np.zeros_like(clean), "correlated", 1.2, rng, sigma=0.01)
    curve = noise_variance_curve(noisy)
    taken_as_white = wiener.collaborative_hard_threshold(noisy, pilot, curve)
    exact = wiener.collaborative_hard_threshold(noisy, pilot, curve, correlated_noise=True)
    guided = wiener.collaborative_wiener(noisy, exact.astype(np.float32), curve, correlated_noise=True)
    assert mse(taken_as_white, clean) > 0.9 * mse(noisy, clean)
    assert mse(exact, clean) < 0.45 * mse(noisy, clean)
    assert mse(guided, clean) < mse(exact, clean)


def test_under_mildly_correlated_noise_the_wiener_gains_weigh_its_variance_less_and_gain(monkeypatch):
    """The weight of the noise variance in the Wiener gains follows how far the noise reaches, read from the
    coefficient table: MILDLY_CORRELATED_WEIGHT_OF_NOISE for noise of a 0.5-pixel kernel (neighbours' correlation
    0.26), 1 for a 1.2-pixel kernel's (0.84). Under the former the weighted gains beat the plain ones."""
    rng = np.random.default_rng(5)
    clean = scan(128)  # flat windows of 32 voxels fit in its background
    weights = {}
    for kernel in (1.2, 0.5):  # the 0.5-pixel kernel's image stays for the filters below
        noisy = add_noise(clean, "correlated", kernel, rng, sigma=0.05)
        curve = noise_variance_curve(noisy)
        estimate = wiener.collaborative_hard_threshold(noisy, noisy, curve, correlated_noise=True).astype(np.float32)
        weights[kernel] = wiener.wiener_weight_of_noise(wiener._coefficient_table(noisy[None], estimate[None], None))
    assert weights[0.5] < 0.5 and weights[1.2] == 1.0
    weighted = wiener.collaborative_wiener(noisy, estimate, curve, correlated_noise=True)
    monkeypatch.setattr(wiener, "wiener_weight_of_noise", lambda table: 1.0)
    plain = wiener.collaborative_wiener(noisy, estimate, curve, correlated_noise=True)
    assert mse(weighted, clean) < 0.95 * mse(plain, clean)


def _filters_2d(noisy, noise_shape: bool, progress=None, deep_groups: bool = True):
    curve = noise_variance_curve(noisy)
    estimate = wiener.collaborative_hard_threshold(noisy, noisy, curve, noise_shape=noise_shape, progress=progress)
    return wiener.collaborative_wiener(noisy, estimate.astype(np.float32), curve, noise_shape=noise_shape,
                                       deep_groups=deep_groups)


def test_a_2d_images_filters_reading_the_noise_shape_remove_mildly_correlated_noise_that_reads_white():
    """Noise blurred by 0.45 pixels reads white by the binning ratio; the filters of white noise leave its low
    frequencies, the filters reading its shape on the image remove them. The progress counts the shape's reads."""
    clean = phantom(128) + 0.05 * textured(128)
    noisy = clean + 0.06 * correlated_gaussian(clean.shape, 0.45, np.random.default_rng(41))
    calls = []
    shaped = _filters_2d(noisy, True, progress=lambda: calls.append(1))
    assert len(calls) == 1 + wiener.noise_shape_steps([0])
    assert mse(shaped, clean) < 0.6 * mse(_filters_2d(noisy, False), clean)
    with pytest.raises(ValueError, match="without context"):
        wiener.collaborative_hard_threshold(np.stack([noisy] * 3), np.stack([noisy] * 3), WHITE, context=1,
                                            noise_shape=True)
    with pytest.raises(ValueError, match="without context"):
        wiener.collaborative_wiener(np.stack([noisy] * 3), np.stack([noisy] * 3), WHITE, context=1, noise_shape=True)


@pytest.mark.parametrize("kind, level, textured_worse", [("gaussian", 0.05, 1.3), ("poisson", 100, 1.75)])
def test_a_2d_images_filters_reading_the_shape_of_white_noise_are_the_white_filters(monkeypatch, kind, level,
                                                                                   textured_worse):
    """White noise of any level reads a shape of one voxel: the image is the white filters', within 10 % of its
    error. Fine texture everywhere leaves some of itself in the residual the shape is read on, which then reads as
    noise: up to 1.3 times the error under Gaussian noise (measured 1.17 at two draws) and 1.75 under Poisson noise
    (1.64 and 1.35; 1.24 and 1.10 when the first step took the DCT, which keeps more of such texture than the Haar
    transform). Such noise reads a binning ratio of about 1, below the 1.3 above which the pipeline has the shape
    read. The white filters are taken with the shaped ones' Wiener step on the patches' DCT: on the groups' own axes
    (WIENER_2D_ON_GROUP_AXES) their error was 0.93 and 0.90 of that on the phantom with texture (Gaussian, Poisson),
    1.00 and 1.19 on the texture alone, which the noise weighed 1.7 times smooths."""
    monkeypatch.setattr(wiener, "WIENER_2D_ON_GROUP_AXES", False)
    for clean, worse in ((phantom(128) + 0.05 * textured(128), 1.1), (textured(128), textured_worse)):
        noisy = add_noise(clean, kind, level, np.random.default_rng(43))
        assert binning_noise_reading(noisy)[0] < NOISE_SHAPE_MIN_BINNING_RATIO
        assert mse(_filters_2d(noisy, True), clean) < worse * mse(_filters_2d(noisy, False), clean)


def test_the_hard_thresholding_estimate_owes_nothing_to_the_pilot_and_averaged_with_it_guides_best():
    """BM3D's first step: matched on y, it needs the pilot only to read the noise curve (constant here); it
    removes most of the noise, keeps a flat region's level, and averaged with a pilot whose errors differ (it lost
    the texture) it guides the Wiener filter better than either alone."""
    clean = textured()
    noisy = add_noise(clean, "gaussian", 0.03, np.random.default_rng(14))
    pilot = gaussian_blur(clean, 1.5) + add_noise(np.zeros_like(clean), "gaussian", 0.01, np.random.default_rng(15))
    estimate = wiener.collaborative_hard_threshold(noisy, pilot, WHITE)
    assert np.array_equal(estimate, wiener.collaborative_hard_threshold(noisy, np.zeros_like(pilot), WHITE))
    assert mse(estimate, clean) < 0.15 * mse(noisy, clean)
    averaged = wiener.collaborative_wiener(noisy, 0.5 * (pilot + estimate), WHITE)
    assert mse(averaged, clean) < 0.95 * mse(wiener.collaborative_wiener(noisy, estimate, WHITE), clean)
    assert mse(averaged, clean) < 0.6 * mse(wiener.collaborative_wiener(noisy, pilot, WHITE), clean)
    flat = add_noise(np.full((48, 48), 0.4), "gaussian", 0.03, np.random.default_rng(16))
    kept = wiener.collaborative_hard_threshold(flat, flat, WHITE)
    assert abs(kept.mean() - flat.mean()) < 2e-3 and mse(kept, np.full((48, 48), 0.4)) < 0.05 * 0.03 ** 2
    with pytest.raises(ValueError, match="hard-thresholding filter needs slices of at least 8 x 8"):
        wiener.collaborative_hard_threshold(np.zeros((6, 40)), np.zeros((6, 40)), WHITE)


def test_the_haar_transform_is_orthonormal_with_the_mean_first_and_the_finest_differences_last():
    for size in (1, 2, 4, 8, 16):
        haar = wiener.haar_matrix(size)
        torch.testing.assert_close(haar @ haar.T, torch.eye(size, dtype=torch.float64))
    haar = wiener.haar_matrix(8)
    torch.testing.assert_close(haar[0], torch.full((8,), 8 ** -0.5, dtype=torch.float64))
    torch.testing.assert_close(haar[-1], torch.tensor([0.0] * 6 + [1.0, -1.0], dtype=torch.float64) / 2 ** 0.5)


def test_each_coefficient_gets_the_noise_curve_where_its_basis_patch_lies():
    """White noise whose variance is 4 on a patch's left half and 1 on its right (Gamma noise at an edge): over
    20,000 draws each Haar coefficient's variance is `_spread_over`'s within 6 %, the finest differences' 4 or 1
    where the patch's mean variance says 2.5 for all, and every DCT coefficient's within a quarter of 2.5."""
    levels = torch.ones(8, 8, dtype=torch.float64)
    levels[:, :4] = 4.0
    draws = torch.randn(20000, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    draws = draws * levels.reshape(-1).sqrt()
    for kind in ("haar", "dct"):
        block = wiener._transform_on(8, torch.device("cpu"), torch.float64, 2, kind)
        spread = wiener._spread_over(levels.reshape(1, 1, 64).expand(1, 3, 64), block)[0, 0]
        measured = (draws @ block.T).var(dim=0)
        torch.testing.assert_close(measured, spread, rtol=0.06, atol=0.0)
        if kind == "haar":  # the finest differences in the bottom right and the bottom left 2 x 2 voxels
            assert block[-1].reshape(8, 8)[6:, 6:].abs().min() > 0 and block[-4].reshape(8, 8)[6:, :2].abs().min() > 0
            assert spread[-1] == pytest.approx(1.0) and spread[-4] == pytest.approx(4.0)
        else:
            assert torch.all((spread - 2.5).abs() < 0.25 * 2.5)


def real_ct_image() -> np.ndarray:
    """A real head CT slice (pydicom-data's 693_UNCR.dcm) averaged over 2 x 2 pixels, on [0, 1], 96 x 96 of skull,
    brain and the air beside them (skips where the data is missing)."""
    try:
        ct = datasets.pydicom_file("693_UNCR.dcm").array[0].astype(np.float64)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    ct = ct.reshape(256, 2, 256, 2).mean(axis=(1, 3))
    low, high = np.percentile(ct, [0.5, 99.5])
    return np.clip((ct[64:160, :96] - low) / (high - low), 0.0, 1.0)


def test_on_a_real_ct_the_first_steps_haar_transform_and_its_noise_where_each_coefficient_lies_gain(monkeypatch):
    """On a real CT slice under white noise of std 0.05, both 2D steps leave less error with the first step
    thresholding each patch's Haar transform than its DCT (measured 0.91, 0.96 and 0.91 of it at three draws), and so
    under noise of a 0.45-pixel kernel (std 0.06) with the shape read in the first step's Haar transform (0.90, 0.91
    and 0.91); under Gamma noise (alpha 100: none in the air, most in the bone) less with each coefficient's noise
    read where its basis patch lies (`_spread_over`) than with the patch's mean (0.97 at two draws)."""
    clean = real_ct_image()
    rng = np.random.default_rng(3)
    white = clean + 0.05 * rng.standard_normal(clean.shape)
    shaped = clean + 0.06 * correlated_gaussian(clean.shape, 0.45, np.random.default_rng(3))
    haar = [_filters_2d(white, False), _filters_2d(shaped, True)]

    def cleared():
        wiener._transform_on.cache_clear()
        wiener._white_table.cache_clear()

    with monkeypatch.context() as patch:
        patch.setitem(wiener.TRANSFORMS, "haar", wiener.dct_matrix)
        cleared()
        dct = [_filters_2d(white, False), _filters_2d(shaped, True)]
    cleared()
    assert mse(haar[0], clean) < 0.97 * mse(dct[0], clean)
    assert mse(haar[1], clean) < 0.95 * mse(dct[1], clean)
    gamma = clean * rng.gamma(100.0, 1.0 / 100.0, clean.shape)
    spread = _filters_2d(gamma, False)
    monkeypatch.setattr(wiener, "_spread_over", lambda levels, block: levels.mean(dim=(1, 2))[:, None, None])
    assert mse(spread, clean) < 0.985 * mse(_filters_2d(gamma, False), clean)


def _correlated_filters_2d(noisy):
    """The 2D correlated-noise filters' two steps, each reading the noise covariance on the image: (estimate, image)."""
    curve = noise_variance_curve(noisy)
    estimate = wiener.collaborative_hard_threshold(noisy, noisy, curve, correlated_noise=True)
    return estimate, wiener.collaborative_wiener(noisy, estimate.astype(np.float32), curve, correlated_noise=True)


def test_on_a_real_ct_under_correlated_noise_haar_thresholds_and_groups_of_similar_patches_gain(monkeypatch):
    """On a real CT slice (skull, brain and air) under correlated noise of std 0.08, the first step leaves less error
    thresholding Haar coefficients than the DCT's under a 0.5-pixel kernel (0.90, 0.86 and 0.85 of it at three
    draws), and the Wiener step less with each group as large as its similar patches allow than with every patch
    of its window, under a 0.5-pixel kernel (0.87, 0.90, 0.91) and a 1.2-pixel one (0.91, 0.87, 0.92)."""
    clean = real_ct_image()
    for kernel in (0.5, 1.2):
        noisy = clean + 0.08 * correlated_gaussian(clean.shape, kernel, np.random.default_rng(3))
        estimate, image = _correlated_filters_2d(noisy)
        with monkeypatch.context() as patch:
            patch.setattr(wiener, "CORRELATED_WIENER_SIMILARITY", float("inf"))
            _, every_patch = _correlated_filters_2d(noisy)
        assert mse(image, clean) < 0.95 * mse(every_patch, clean)
        if kernel == 0.5:
            with monkeypatch.context() as patch:
                patch.setitem(wiener.TRANSFORMS, "haar", wiener.dct_matrix)
                wiener._transform_on.cache_clear()
                dct, _ = _correlated_filters_2d(noisy)
            wiener._transform_on.cache_clear()
            assert mse(estimate, clean) < 0.95 * mse(dct, clean)


def test_on_a_real_ct_slab_under_correlated_noise_the_wiener_groups_across_slices_are_cut_to_similar_members(
        monkeypatch):
    """On 8 slices of a real head CT under correlated noise (kernel 1.2, std 0.08), guided by a pilot that lost the
    finest texture, the Wiener step across slices (4 either way, as a 2.5D model's) leaves less error with each
    group as large as its similar members allow (up to 128) than with the fixed groups of 64 it had before (0.98 and
    0.95 of it at two draws)."""
    clean = real_ct_slab()

    def filtered(noisy, pilot):
        return wiener.collaborative_wiener(noisy, pilot, noise_variance_curve(noisy), context=4, indices=[4],
                                           correlated_noise=True, covariance_on_residual=True)[0]

    for seed in (0, 2):
        rng = np.random.default_rng(seed)
        noisy = add_noise(clean, "correlated", 1.2, rng, sigma=0.08)
        pilot = (np.stack([gaussian_blur(s, 0.7) for s in clean])
                 + add_noise(np.zeros_like(clean), "correlated", 1.2, rng, sigma=0.02)).astype(np.float32)
        similar = filtered(noisy, pilot)
        with monkeypatch.context() as patch:
            patch.setattr(wiener, "CORRELATED_WIENER_SIMILARITY_ACROSS_SLICES", float("inf"))
            patch.setattr(wiener, "CORRELATED_WIENER_GROUP_ACROSS_SLICES", 64)
            fixed = filtered(noisy, pilot)
        assert mse(similar, clean[4]) < 0.99 * mse(fixed, clean[4]), seed


def test_a_group_is_as_large_as_its_similar_members_allow():
    """The largest of the group and its halvings whose first members all lie within the limit (they come nearest
    first, as matched; a nearer one after a farther one does not count)."""
    members = 16
    values = torch.tensor([0.0, 0.1, 10.0])  # a flat image's voxels, by index
    all_alike = torch.zeros(members, dtype=torch.long)  # every member on the reference's value
    five_alike = torch.tensor([0] * 5 + [2] * 11)  # five members alike, then one far off
    second_off = torch.tensor([0, 2] + [1] * 14)  # the second member already too far, the rest near again
    pixels = torch.stack([all_alike, five_alike, second_off])[..., None]  # (R, group, 1 voxel)
    sizes = wiener._similar_group_sizes(pixels, values, within=0.5, group=members, smallest=1)
    assert sizes.tolist() == [16, 4, 1]
    assert wiener._similar_group_sizes(pixels, values, within=0.5, group=members, smallest=8).tolist() == [16, 8, 8]
    one_each = torch.tensor([[0.5], [0.5], [200.0]])  # a limit per reference: the third's lets every member in
    assert wiener._similar_group_sizes(pixels, values, within=one_each, group=members, smallest=1).tolist() == [16, 4,
                                                                                                               16]


def test_on_a_real_ct_under_white_noise_the_wiener_step_gains_from_groups_of_similar_patches(monkeypatch):
    """On a real CT slice (skull, brain and air) under white noise of std 0.1, both 2D steps leave less error with
    the Wiener step's groups as large as their similar patches allow (up to WIENER_GROUP_2D) than with GROUP patches
    each within SEARCH_RADIUS, every STEP-th voxel (measured 0.94, 0.93 and 0.94 of it at three draws). Fast's
    shallower groups (up to SHALLOW_WIENER_GROUP_2D, for a fifth of the step's time) lie between the two (deep:
    0.963 to 0.965 of their error; theirs 0.96 to 0.98 of GROUP's; at std 0.05 0.95 to 0.97 and 0.98 to 1.00)."""
    clean = real_ct_image()
    noisy = clean + 0.1 * np.random.default_rng(3).standard_normal(clean.shape)
    similar, shallow = _filters_2d(noisy, False), _filters_2d(noisy, False, deep_groups=False)
    assert mse(similar, clean) < 0.98 * mse(shallow, clean)
    monkeypatch.setattr(wiener, "WIENER_GROUP_2D", wiener.GROUP)
    monkeypatch.setattr(wiener, "WIENER_RADIUS_2D", wiener.SEARCH_RADIUS)
    monkeypatch.setattr(wiener, "WIENER_STEP_2D", wiener.STEP)
    old = _filters_2d(noisy, False)
    assert mse(similar, clean) < 0.96 * mse(old, clean)
    assert mse(shallow, clean) < 0.99 * mse(old, clean)


def slowly_changing_volume(slices=8, side=48):
    """Texture and anatomy whose contrast changes a little from slice to slice, as in a thin-slice scan."""
    texture, anatomy = textured(side), phantom(side)
    return np.stack([texture * (0.8 + 0.05 * z) + 0.1 * anatomy for z in range(slices)])


def test_the_volumetric_filters_cubes_beat_patches_gathered_from_neighbouring_slices():
    """BM4D's two steps on cubes use that the anatomy goes on from slice to slice; BM3D's two steps with 2D patches
    from two slices each way (no networks either) use it less. The volume and the curve are not modified."""
    clean = slowly_changing_volume()
    noisy = add_noise(clean, "gaussian", 0.03, np.random.default_rng(17))
    before = noisy.copy()
    cubes = wiener.volumetric_filter(noisy, WHITE)
    assert np.array_equal(noisy, before) and cubes.shape == noisy.shape and cubes.dtype == np.float64
    hard = wiener.collaborative_hard_threshold(noisy, noisy, WHITE, context=2)
    patches = wiener.collaborative_wiener(noisy, hard.astype(np.float32), WHITE, context=2)
    assert mse(cubes, clean) < 0.75 * mse(patches, clean) < 0.1 * mse(noisy, clean)
    some = wiener.volumetric_filter(noisy, WHITE, indices=[5, 3])
    assert some.shape == (2, 48, 48)
    assert mse(some, cubes[[3, 5]]) < 0.05 * mse(cubes[[3, 5]], clean[[3, 5]]), "nearly the whole run's slices"


def test_under_mildly_correlated_noise_the_volumetric_filter_reading_its_shape_removes_what_white_ones_keep():
    """Noise blurred by half a pixel in each slice: told it is white, the cubes' thresholds and gains are too low
    for its low frequencies, which stay as blotches; with the noise's shape read on the volume itself they go, the
    more for reading it again on each new first step. The input is not modified, and the progress ends where
    `volumetric_filter_steps` says."""
    clean = np.stack([phantom(64) * (1 + 0.03 * z) + 0.05 * textured(64) for z in range(8)])
    noisy = clean + 0.03 * correlated_gaussian(clean.shape, 0.5, np.random.default_rng(23))
    before = noisy.copy()
    curve = noise_variance_curve(noisy)
    white = wiener.volumetric_filter(noisy, curve)
    calls = []
    shaped = wiener.volumetric_filter(noisy, curve, correlated_noise=True, progress=lambda: calls.append(1))
    assert np.array_equal(noisy, before)
    assert len(calls) == wiener.volumetric_filter_steps(8, range(8), correlated_noise=True)
    assert mse(shaped, clean) < 0.3 * mse(white, clean) < 0.5 * mse(noisy, clean)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wiener, "SHAPE_ROUNDS", 1)
        read_once = wiener.volumetric_filter(noisy, curve, correlated_noise=True)
    assert mse(shaped, clean) < 0.75 * mse(read_once, clean)


def test_under_mildly_correlated_noise_the_volumetric_filter_thresholds_higher_takes_deeper_cubes_and_gains():
    """Where the read noise shape correlates neighbouring voxels (half a pixel's blur reads about 0.19 here; white
    noise about 0) the first step thresholds at CORRELATED_CUBE_HARD_THRESHOLD and the Wiener step's cubes are
    CORRELATED_WIENER_CUBE voxels a side, whose coefficients part the noise's low frequencies from its high ones
    better than 4-voxel cubes' (measured 0.87 of the filter's error with white noise's settings here, the Wiener
    step's weight of the noise left at 1: this phantom's smooth shapes lose with the lower weight, which real anatomy
    gains by, as the next test measures). The progress still ends where `volumetric_filter_steps` says."""
    clean = np.stack([phantom(64) * (1 + 0.03 * z) + 0.05 * textured(64) for z in range(8)])
    noisy = clean + 0.03 * correlated_gaussian(clean.shape, 0.5, np.random.default_rng(23))
    white = add_noise(clean, "gaussian", 0.03, np.random.default_rng(23))
    curve = noise_variance_curve(noisy)
    read, calls = [], []
    reads_correlated = wiener.reads_correlated
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wiener, "CUBE_WEIGHT_OF_NOISE", 1.0)
        patch.setattr(wiener, "reads_correlated", lambda table: read.append(reads_correlated(table)) or read[-1])
        settled = wiener.volumetric_filter(noisy, curve, correlated_noise=True, progress=lambda: calls.append(1))
        wiener.volumetric_filter(white, noise_variance_curve(white), correlated_noise=True)
        assert read == [True, False] and wiener.CORRELATED_WIENER_CUBE > wiener.CUBE
        assert wiener.CORRELATED_CUBE_HARD_THRESHOLD > wiener.CUBE_HARD_THRESHOLD
        assert len(calls) == wiener.volumetric_filter_steps(8, range(8), correlated_noise=True)
        patch.setattr(wiener, "reads_correlated", lambda table: False)
        as_white = wiener.volumetric_filter(noisy, curve, correlated_noise=True)
    assert mse(settled, clean) < 0.95 * mse(as_white, clean)


def test_the_shared_noise_penalty_adds_twice_the_cubes_expected_shared_noise_at_each_candidate_offset():
    """Two cubes d apart share noise B R(d) (B voxels): each candidate of `_match`'s order (first slice, dy, dx) gets
    SHARED_NOISE_CORRECTION times 2 B R(d) times the noise variance at its reference cube."""
    covariance = np.zeros((3, 5, 5))
    covariance[1, 2, 2], covariance[1, 2, 3], covariance[1, 2, 1], covariance[0, 2, 2] = 1.0, 0.3, 0.3, 0.2
    covariance[2, 2, 2] = 0.2  # R(-d) = R(d)
    cube, radius, centre, starts = wiener.CUBE, 3, 2, 5
    basis = wiener._transform_on(cube, torch.device("cpu"), torch.float64, dims=3).reshape((-1,) + (cube,) * 3)
    table = coefficient_covariance(covariance, basis, wiener.CUBE_TABLE_REACH, max_slices=2 * wiener.CUBE_SLICE_REACH)
    level = torch.full((cube, 12, 12), 2.0)
    level[:, :, 6:] = 3.0  # a reference cube over both halves averages them
    penalty = wiener._shared_noise(table.float(), centre, starts, radius, level, cube)(torch.tensor([0]),
                                                                                       torch.tensor([0, 4, 8]))
    side = 2 * radius + 1
    expected = np.zeros((starts, side, side))
    expected[centre, radius, radius] = 1.0
    expected[centre, radius, radius + 1] = expected[centre, radius, radius - 1] = 0.3
    expected[centre + 1, radius, radius] = expected[centre - 1, radius, radius] = 0.2
    scale = wiener.SHARED_NOISE_CORRECTION * 2 * cube ** 3 * np.array([2.0, 2.5, 3.0])[:, None]
    np.testing.assert_allclose(penalty.numpy(), scale * expected.reshape(1, -1), rtol=1e-4, atol=1e-4)


def real_ct_slab() -> np.ndarray:
    """8 slices of a real head CT, 96 x 96 of the brain and skull, on [0, 1] (skips where the data is missing)."""
    try:
        ct = datasets.invesalius_head_ct().array
    except FileNotFoundError as error:
        pytest.skip(str(error))
    low, high = np.percentile(ct, [0.5, 99.5])
    first = ct.shape[0] // 2 - 4
    return np.clip((ct[first:first + 8, 80:176, 80:176] - low) / (high - low), 0.0, 1.0)


def test_on_a_real_ct_the_white_noise_table_gains_over_taking_the_members_as_independent():
    """On 8 slices of a real head CT at white noise of std 0.05, the volumetric filter with the group variances of
    white noise (`_white_table`) leaves less error than with one variance per group (members independent: the
    table at offset 0 only). Measured 0.96 of it (0.96 at another draw; 0.97 to 0.98 at std 0.03, 0.93 to 0.96 at
    0.1)."""
    clean = real_ct_slab()
    noisy = clean + 0.05 * np.random.default_rng(3).standard_normal(clean.shape)
    curve = noise_variance_curve(noisy)
    exact = wiener.volumetric_filter(noisy, curve)
    white = wiener._white_table

    def independent(*args) -> torch.Tensor:
        table = white(*args)
        alone = torch.zeros_like(table)
        centre = (table.shape[0] // 2, table.shape[1] // 2, table.shape[2] // 2)
        alone[centre] = table[centre]
        return alone

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wiener, "_white_table", independent)
        alone = wiener.volumetric_filter(noisy, curve)
    assert mse(exact, clean) < 0.98 * mse(alone, clean)


def test_on_a_real_ct_under_white_noise_the_volumetric_wiener_step_gains_from_groups_of_similar_cubes(monkeypatch):
    """On 8 slices of a real head CT at white noise of std 0.1, the volumetric filter's Wiener groups as deep as
    their similar cubes allow (up to CUBE_WIENER_GROUP) leave less error than CUBE_GROUP_WIENER cubes each
    (measured 0.87, 0.91 and 0.87 of it at three draws; 0.94 to 0.95 at std 0.05, 0.97 to 0.98 at 0.03)."""
    clean = real_ct_slab()
    noisy = clean + 0.1 * np.random.default_rng(3).standard_normal(clean.shape)
    curve = noise_variance_curve(noisy)
    similar = wiener.volumetric_filter(noisy, curve)
    monkeypatch.setattr(wiener, "CUBE_WIENER_GROUP", wiener.CUBE_GROUP_WIENER)
    assert mse(similar, clean) < 0.93 * mse(wiener.volumetric_filter(noisy, curve), clean)


@pytest.mark.parametrize("deep", [True, False], ids=["Full's deep groups", "Fast's groups"])
def test_on_a_real_ct_under_white_noise_the_volumetric_wiener_step_gains_on_each_groups_own_axes(monkeypatch, deep):
    """On 8 slices of a real head CT at white noise of std 0.05, the Wiener step filtering each group's deviations
    on the pilot group's own axes (`_shrink_on_group_covariance`) leaves less error than on the cubes' fixed DCT
    (measured 0.963 of it with Full's deep groups, 0.968 with Fast's; 0.947 and 0.953 at another draw, 0.95 to 0.97
    at std 0.1, 0.97 to 0.98 at 0.03)."""
    clean = real_ct_slab()
    noisy = clean + 0.05 * np.random.default_rng(3).standard_normal(clean.shape)
    curve = noise_variance_curve(noisy)
    on_axes = wiener.volumetric_filter(noisy, curve, deep_groups=deep)
    monkeypatch.setattr(wiener, "CUBE_WIENER_ON_GROUP_AXES", False)
    assert mse(on_axes, clean) < 0.985 * mse(wiener.volumetric_filter(noisy, curve, deep_groups=deep), clean)


def _group_spectra(members: torch.Tensor):
    """The 3D spectra (R, group, 64) of groups of 4x4x4 cubes (R, group, 64) and the transforms that made them."""
    dct1 = wiener._transform_on(members.shape[1], torch.device("cpu"), torch.float64)
    block = wiener._transform_on(4, torch.device("cpu"), torch.float64, dims=3)
    return dct1 @ (members @ block.T), dct1, block


def test_on_its_groups_own_axes_the_wiener_step_keeps_what_the_pilot_shows_and_drops_what_it_does_not():
    """Where the pilot's members differ far above the noise, y's deviations along the pilot's axes come back whole
    and the noise off them goes; where the pilot's members are all alike each member becomes the group's mean; the
    aggregation weight falls as the noise left rises."""
    rng = np.random.default_rng(0)
    group, voxels = 16, 64
    pilot = torch.from_numpy(rng.normal(0.5, 1.0, (2, group, voxels)))
    y = pilot + torch.from_numpy(0.01 * rng.standard_normal(pilot.shape))
    cy, dct1, block = _group_spectra(y)
    cm = _group_spectra(pilot)[0]
    variance = torch.full((2, 2, voxels), 1e-4, dtype=cy.dtype)  # the mean row's and the deviations'
    kept, weight = wiener._shrink_on_group_covariance(cy, cm, variance, dct1, block)
    # the pilot's 15 axes of deviation and the mean keep their noise, the other 48 of 64 dimensions lose it
    assert 0.2 < mse(kept.numpy(), pilot.numpy()) / mse(y.numpy(), pilot.numpy()) < 0.3

    flat_pilot = torch.full_like(pilot, 0.5)
    alike, flat_weight = wiener._shrink_on_group_covariance(cy, _group_spectra(flat_pilot)[0], variance, dct1, block)
    np.testing.assert_allclose(alike.numpy(), alike.numpy().mean(axis=1, keepdims=True).repeat(group, axis=1),
                               atol=1e-9)
    assert torch.all(flat_weight > weight)  # nothing of the deviations' noise is left to weigh


@pytest.mark.parametrize("group", [16, 128], ids=["Gram matrix", "covariance"])
def test_on_its_groups_own_axes_with_the_noise_changing_across_a_patch_the_wiener_step_is_the_matrix_wiener(group):
    """With the noise curve at each voxel (`levels`, Poisson's or Gamma's noise at an edge) the step is the matrix
    Wiener filter C (C + w S)^-1 of each deviation, S the voxels' noise taken to the coefficients and scaled to each
    coefficient's variance, and its aggregation weight one over the noise left, trace(A^T S A) per deviation: the
    whitening in voxels gives what the dense solve gives, by either way to the axes."""
    rng = np.random.default_rng(1)
    block = wiener._transform_on(8, torch.device("cpu"), torch.float64, dims=2)
    dct1 = wiener._transform_on(group, torch.device("cpu"), torch.float64)
    pilot = torch.from_numpy(rng.normal(0.5, 0.3, (3, group, 64)))
    noise_levels = torch.from_numpy(rng.uniform(0.01, 0.05, (3, group, 64)))
    y = pilot + noise_levels.sqrt() * torch.from_numpy(rng.standard_normal(pilot.shape))
    cy, cm = dct1 @ (y @ block.T), dct1 @ (pilot @ block.T)
    variance = torch.from_numpy(rng.uniform(0.8, 1.2, (3, 2, 64))) * wiener._spread_over(noise_levels, block)
    levels, scale = noise_levels.mean(dim=1), 1.7
    filtered, weight = wiener._shrink_on_group_covariance(cy, cm, variance, dct1, block, 1.0, levels, scale)

    noise = (block * levels[:, None, :]) @ block.T
    to_variance = (variance[:, 1] / noise.diagonal(dim1=1, dim2=2)).sqrt()
    noise = noise * to_variance[:, :, None] * to_variance[:, None, :]
    signal = cm[:, 1:].transpose(1, 2) @ cm[:, 1:] / group
    wiener_matrix = torch.linalg.solve(signal + scale * noise, signal)
    mean_gain = cm[:, 0] ** 2 / (cm[:, 0] ** 2 + variance[:, 0])
    mean_gain[:, 0] = 1.0
    expected = dct1.T @ torch.cat([(mean_gain * cy[:, 0])[:, None], cy[:, 1:] @ wiener_matrix], dim=1) @ block
    left = (wiener_matrix.transpose(1, 2) @ noise @ wiener_matrix).diagonal(dim1=1, dim2=2).sum(dim=-1)
    torch.testing.assert_close(filtered, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(weight[:, 0, 0], 1.0 / ((group - 1) * left + (mean_gain ** 2 * variance[:, 0]).sum(-1)))


@pytest.mark.parametrize("kind, level, bound", [("gaussian", 0.05, 0.88), ("poisson", 100, 0.9)])
@pytest.mark.parametrize("deep", [True, False], ids=["Full's deep groups", "Fast's groups"])
def test_on_a_real_ct_slice_under_white_noise_the_2d_wiener_step_gains_on_each_groups_own_axes(
        monkeypatch, kind, level, bound, deep):
    """On a slice of a real head CT, its first step's estimate as the pilot, the 2D Wiener step on the pilot
    group's own axes (WIENER_2D_ON_GROUP_AXES, the noise's covariance following the curve across each patch) leaves
    less error than on the patches' DCT: measured 0.80 and 0.80 (Gaussian std 0.05; 0.85 and 0.86 at another draw,
    0.83 to 0.88 at std 0.02), 0.80 and 0.83 (Poisson 100; 0.87 and 0.89) with Full's and Fast's groups."""
    clean = real_ct_slab()[4]
    noisy = add_noise(clean, kind, level, np.random.default_rng(3))
    curve = noise_variance_curve(noisy)
    pilot = wiener.collaborative_hard_threshold(noisy, noisy, curve)
    on_axes = wiener.collaborative_wiener(noisy, pilot, curve, deep_groups=deep)
    monkeypatch.setattr(wiener, "WIENER_2D_ON_GROUP_AXES", False)
    assert mse(on_axes, clean) < bound * mse(wiener.collaborative_wiener(noisy, pilot, curve, deep_groups=deep), clean)


@pytest.mark.parametrize("correlated, bound", [(True, 0.97), (False, 0.99)], ids=["kernel 0.5", "white"])
def test_on_a_real_ct_the_wiener_weight_and_under_correlated_noise_the_search_and_matching_correction_gain(
        correlated, bound):
    """On 8 slices of a real head CT (96 x 96 of the brain and skull) at noise std 0.05, the Wiener step's lower
    weight of the noise (CUBE_WEIGHT_OF_NOISE) leaves less error than a weight of 1 under white noise (measured 0.98
    of it; 0.98 at std 0.03, 1.00 at 0.1), and under noise of a 0.5-pixel kernel, with the wider search
    (CORRELATED_CUBE_SEARCH_RADIUS) and the first step's correction for shared noise (`_shared_noise`), than without
    the three (measured 0.95; 0.96 and 0.96 on two other slabs, with a weight of 0.5)."""
    clean = real_ct_slab()
    rng = np.random.default_rng(3)
    noisy = clean + 0.05 * (correlated_gaussian(clean.shape, 0.5, rng) if correlated else rng.standard_normal(
        clean.shape))
    curve = noise_variance_curve(noisy)
    settled = wiener.volumetric_filter(noisy, curve, correlated_noise=correlated)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wiener, "CUBE_WEIGHT_OF_NOISE", 1.0)
        patch.setattr(wiener, "CORRELATED_CUBE_SEARCH_RADIUS", wiener.CUBE_SEARCH_RADIUS)
        patch.setattr(wiener, "SHARED_NOISE_CORRECTION", 0.0)
        without = wiener.volumetric_filter(noisy, curve, correlated_noise=correlated)
    assert mse(settled, clean) < bound * mse(without, clean)


def test_a_noise_shape_that_reads_white_leaves_the_wiener_step_that_of_white_noise(monkeypatch):
    """The shape read spreads the noise in the first step; the Wiener step takes it only where it does not read
    white (a 0.5-pixel kernel's noise), and white noise's spread otherwise (white noise read as a shape)."""
    clean = np.stack([phantom(48) * (1 + 0.03 * z) + 0.05 * textured(48) for z in range(8)])
    steps = []
    filter_cubes = wiener._filter_cubes

    def recorded(*args, **kwargs):
        steps.append((kwargs["wiener"], kwargs.get("table") is not None))
        return filter_cubes(*args, **kwargs)

    monkeypatch.setattr(wiener, "_filter_cubes", recorded)
    for kind, level, shaped in (("gaussian", 0.05, False), ("correlated", 0.5, True)):
        noisy = add_noise(clean, kind, level, np.random.default_rng(5), **({"sigma": 0.05} if shaped else {}))
        steps.clear()
        wiener.volumetric_filter(noisy, noise_variance_curve(noisy), correlated_noise=True)
        # the first step's last run thresholds with the shape (its first read starts from white noise's)
        assert steps[-2:] == [(False, True), (True, shaped)], kind


@pytest.mark.parametrize("kind, level", [("gaussian", 0.05), ("poisson", 100), ("gamma", 30)])
def test_reading_the_noise_shape_leaves_the_filter_of_white_noise_of_any_kind_as_it_was(kind, level):
    """White noise whose level follows the intensity (Poisson, Gamma: 10 to 100 times the variance from the darkest
    tissue to the brightest) reads a shape of one voxel: the level stays the noise curve's at each group's intensity,
    and the result is the white filter's, within 10 % of its error."""
    clean = np.stack([phantom(64) * (1 + 0.03 * z) + 0.05 * textured(64) for z in range(8)])
    noisy = add_noise(clean, kind, level, np.random.default_rng(31))
    curve = noise_variance_curve(noisy)
    white = wiener.volumetric_filter(noisy, curve)
    shaped = wiener.volumetric_filter(noisy, curve, correlated_noise=True)
    assert mse(shaped, clean) < 1.1 * mse(white, clean) < 0.05 * mse(noisy, clean)


def _matching_once(shaped, baseline, clean):
    """The shape's reads of the filter `shaped()` match as many blocks as `baseline()` (the same filter without
    them, or reading the shape once), and give the image that matching them anew each time gives, within 0.1 % of
    its error."""
    matched = []
    real = wiener._match

    def counted(*args, **kwargs):
        matched.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wiener, "_match", counted)
        kept = shaped()
        once = len(matched)
        matched.clear()
        baseline()
        assert once == len(matched) > 0
        keeping_none = wiener.MatchedGroups
        patch.setattr(wiener, "MatchedGroups", lambda group: keeping_none(group, keep_new=False))  # each run anew
        anew = shaped()
    assert abs(mse(kept, clean) - mse(anew, clean)) < 1e-3 * mse(anew, clean)


def test_the_shape_reads_match_the_first_steps_cubes_once():
    """The first step's groups are matched on y, the same in each of its runs that read the noise's shape: reading
    it SHAPE_ROUNDS times matches no more cubes than reading it once (on 20 slices, of which 16 are read), and gives
    the image that matching them anew each time gives, within 0.1 % of its error. (The first step's run after the
    reads matches afresh, corrected with the shape read for the noise near cubes share, `_shared_noise`; the
    correction is left out here, where it would make the reads' groups differ from those matched anew.)"""
    clean = np.stack([phantom(48) * (1 + 0.02 * z) + 0.05 * textured(48) for z in range(20)])
    noisy = clean + 0.03 * correlated_gaussian(clean.shape, 0.5, np.random.default_rng(5))
    curve = noise_variance_curve(noisy)

    def filtered() -> np.ndarray:
        return wiener.volumetric_filter(noisy, curve, correlated_noise=True)

    def read_once() -> np.ndarray:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(wiener, "SHAPE_ROUNDS", 1)
            return filtered()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wiener, "SHARED_NOISE_CORRECTION", 0.0)
        _matching_once(filtered, read_once, clean)


def test_a_2d_images_shape_reads_match_its_patches_once():
    """The same for a 2D image's hard-thresholding step: reading the shape matches no more patches than the step of
    white noise, and its estimate is the one matching them anew each time gives."""
    clean = phantom(64) + 0.05 * textured(64)
    noisy = clean + 0.06 * correlated_gaussian(clean.shape, 0.45, np.random.default_rng(6))
    curve = noise_variance_curve(noisy)
    _matching_once(lambda: wiener.collaborative_hard_threshold(noisy, noisy, curve, noise_shape=True),
                   lambda: wiener.collaborative_hard_threshold(noisy, noisy, curve), clean)


def test_the_noise_shape_is_read_on_the_middle_slices_so_its_cost_does_not_grow_with_the_volume():
    extra = [wiener.volumetric_filter_steps(n, range(n), correlated_noise=True) - wiener.volumetric_filter_steps(
        n, range(n)) for n in (wiener.COVARIANCE_SLICES, 40, 300, 1000)]
    assert 0 < extra[0] <= extra[1] == extra[2] == extra[3]


def test_the_volumetric_filter_keeps_a_flat_level_and_reports_each_reference_slice():
    flat = add_noise(np.full((6, 40, 40), 0.4), "gaussian", 0.03, np.random.default_rng(16))
    calls = []
    kept = wiener.volumetric_filter(flat, WHITE, progress=lambda: calls.append(1))
    assert abs(kept.mean() - flat.mean()) < 1e-3 and mse(kept, np.full_like(kept, 0.4)) < 0.02 * 0.03 ** 2
    assert len(calls) == wiener.volumetric_filter_steps(6, range(6)) > 0
    token = CancelToken()

    def cancel_after_first():
        token.cancel()
        token.raise_if_cancelled()

    with pytest.raises(Cancelled):
        wiener.volumetric_filter(flat, WHITE, progress=cancel_after_first)


@pytest.mark.parametrize("volume,message", [
    (np.zeros((40, 40)), "a volume of at least 4 slices"),
    (np.zeros((3, 40, 40)), "a volume of at least 4 slices"),
    (np.zeros((6, 6, 40)), "slices of at least 8 x 8"),
])
def test_the_volumetric_filter_refuses_what_is_not_a_volume_with_a_reason(volume, message):
    with pytest.raises(ValueError, match=message):
        wiener.volumetric_filter(volume, WHITE)


def test_the_filter_reports_each_slice_and_stops_when_told():
    noisy = add_noise(np.stack([phantom(32)] * 4), "gaussian", 0.03, np.random.default_rng(11))
    calls = []
    wiener.collaborative_wiener(noisy, noisy, WHITE, passes=2, indices=[1], progress=lambda: calls.append(1))
    assert len(calls) == 2  # context 0: each pass filters only the slice asked for
    token = CancelToken()

    def cancel_after_first():
        token.cancel()
        token.raise_if_cancelled()

    with pytest.raises(Cancelled):
        wiener.collaborative_wiener(noisy, noisy, WHITE, progress=cancel_after_first)


@pytest.mark.parametrize("noisy,pilot,options,message", [
    (np.zeros((16, 16)), np.zeros((16, 17)), {}, "one 2D or 3D shape"),
    (np.zeros((2, 2, 16, 16)), np.zeros((2, 2, 16, 16)), {}, "one 2D or 3D shape"),
    (np.zeros((6, 40)), np.zeros((6, 40)), {}, "at least 8 x 8"),
    (np.zeros((16, 16)), np.zeros((16, 16)), {"passes": 0}, "1 or more passes"),
    (np.zeros((16, 16)), np.zeros((16, 16)), {"context": -1}, "context of 0 or more"),
    (np.zeros((3, 16, 16)), np.zeros((3, 16, 16)), {"indices": [3]}, "within the image's 3 slice"),
])
def test_the_filter_refuses_bad_arguments_with_a_reason(noisy, pilot, options, message):
    with pytest.raises(ValueError, match=message):
        wiener.collaborative_wiener(noisy, pilot, WHITE, **options)


def test_a_large_slice_filtered_a_few_rows_of_references_at_a_time_gives_the_same_result(monkeypatch):
    noisy = add_noise(np.stack([textured(48)] * 3), "gaussian", 0.03, np.random.default_rng(12))
    pilot = np.stack([gaussian_blur(s, 1.0) for s in noisy])
    at_once = wiener.collaborative_wiener(noisy, pilot, WHITE, context=1, indices=[1])
    monkeypatch.setattr(wiener, "REFERENCE_CHUNK", 30)  # two rows of references at a time
    np.testing.assert_allclose(wiener.collaborative_wiener(noisy, pilot, WHITE, context=1, indices=[1]), at_once,
                               atol=1e-6)


def test_under_correlated_noise_the_groups_of_the_neighbouring_slices_feed_a_slice_too():
    """Across slices under correlated noise every group goes back to each slice its members lie in (as BM4D
    aggregates), so one slice of a 7-slice stack takes the reference slices within the context, each counted by
    `progress`; a slice range then gives what the whole stack gives there. Under white noise a slice feeds itself."""
    rng = np.random.default_rng(6)
    clean = np.stack([scan(48)] * 7)
    noisy = add_noise(clean, "correlated", 1.2, rng, sigma=0.05)
    pilot = np.stack([gaussian_blur(s, 1.0) for s in noisy])
    curve = noise_variance_curve(noisy)
    calls = []
    one = wiener.collaborative_wiener(noisy, pilot, curve, context=2, indices=[3], correlated_noise=True,
                                      progress=lambda: calls.append(1))
    assert len(calls) == 5 == wiener.wiener_reference_slices(7, [3], 2, True)
    whole = wiener.collaborative_wiener(noisy, pilot, curve, context=2, correlated_noise=True)
    np.testing.assert_allclose(one[0], whole[3], atol=1e-6)
    calls.clear()
    wiener.collaborative_wiener(noisy, pilot, curve, context=2, indices=[3], progress=lambda: calls.append(1))
    assert len(calls) == 1 == wiener.wiener_reference_slices(7, [3], 2, False)
    assert wiener.wiener_reference_slices(7, [0], 2, True) == 3 and wiener.wiener_reference_slices(7, [3], 0, True) == 1


def test_a_slice_given_the_slices_its_wiener_step_reads_gets_what_the_whole_stack_gives_there(monkeypatch):
    """Under correlated noise a slice's reference slices within the context read the context beyond them too
    (`slices_read`: twice the context), so the slice filtered in that sub-stack equals the whole stack's; with
    the context alone on either side its outer reference slices see fewer neighbours and it differs. (The noise
    covariance, read on the slices given, is the whole stack's in both.)"""
    rng = np.random.default_rng(7)
    clean = np.stack([np.roll(scan(48), k, axis=1) for k in range(11)])
    noisy = add_noise(clean, "correlated", 1.2, rng, sigma=0.05)
    pilot = np.stack([gaussian_blur(s, 1.0) for s in noisy])
    curve = noise_variance_curve(noisy)
    covariance = wiener.estimate_noise_covariance(noisy, pilot, depth=4)
    monkeypatch.setattr(wiener, "estimate_noise_covariance", lambda *args, **kwargs: covariance)
    assert wiener.slices_read(2, True) == 4 and wiener.slices_read(2, False) == 2
    whole = wiener.collaborative_wiener(noisy, pilot, curve, context=2, correlated_noise=True)
    for reach, same in ((4, True), (2, False)):
        lo, hi = 5 - reach, 5 + reach + 1
        part = wiener.collaborative_wiener(noisy[lo:hi], pilot[lo:hi], curve, context=2, indices=[5 - lo],
                                           correlated_noise=True)[0]
        assert np.allclose(part, whole[5], atol=1e-6) == same, reach


def test_groups_matched_on_an_estimate_whose_errors_do_not_follow_the_noise_keep_less_of_it(monkeypatch):
    """Under correlated noise: an estimate whose errors follow the noise at each voxel (a student's, which sees
    it) groups patches by their noise, which the group's average keeps; matching on an estimate with errors of
    its own (a blind-spot network's, here blurred) and taking only the gains from the first keeps less, and does
    far better than that estimate's own gains. Gains taken from the pilot itself change nothing. The groups are
    the fixed 64 across slices they were when this was measured: cut to their similar members (as now), groups
    matched on the noise-following estimate lose the members whose noise differs, and on this phantom matching
    apart then leaves 0.95 to 1.00 of the error at two draws instead of 0.84 to 0.91."""
    monkeypatch.setattr(wiener, "CORRELATED_WIENER_SIMILARITY_ACROSS_SLICES", float("inf"))
    monkeypatch.setattr(wiener, "CORRELATED_WIENER_GROUP_ACROSS_SLICES", 64)
    rng = np.random.default_rng(5)
    clean = np.stack([scan(64)] * 5)
    noisy = add_noise(clean, "correlated", 1.2, rng, sigma=0.05)
    follows_noise = np.stack([gaussian_blur(s, 0.7) for s in clean]) + 0.4 * (noisy - clean)
    own_errors = np.stack([gaussian_blur(s, 1.5) for s in clean]) + add_noise(np.zeros_like(clean), "correlated",
                                                                             1.2, rng, sigma=0.02)
    curve = noise_variance_curve(noisy)
    options = dict(context=2, indices=[2], correlated_noise=True)
    on_itself = wiener.collaborative_wiener(noisy, follows_noise, curve, **options)[0]
    matched_apart = wiener.collaborative_wiener(noisy, own_errors, curve, gains_from=follows_noise, **options)[0]
    own_gains = wiener.collaborative_wiener(noisy, own_errors, curve, **options)[0]
    # (0.84 of it when only the reference slice's own patches went back, 0.91 now that every group goes back to
    # each slice its members lie in: the groups of the neighbouring slices average some of that noise away too)
    assert mse(matched_apart, clean[2]) < 0.95 * mse(on_itself, clean[2])
    assert mse(matched_apart, clean[2]) < 0.5 * mse(own_gains, clean[2])
    np.testing.assert_array_equal(wiener.collaborative_wiener(noisy, own_errors, curve, **options),
                                  wiener.collaborative_wiener(noisy, own_errors, curve, gains_from=own_errors,
                                                              **options))


@pytest.mark.parametrize("deep", [True, False], ids=["Full's groups", "Fast's groups"])
def test_several_weights_of_the_noise_at_once_give_each_weights_own_filter(deep):
    """noise_weight.py tries every weight of the noise on one matching: each slice of the result is bit for bit the
    filter with that weight alone, on a stack and on one slice."""
    clean = real_ct_image()
    noisy = add_noise(clean, "poisson", 100, np.random.default_rng(4))
    curve = noise_variance_curve(noisy)
    pilot = wiener.collaborative_hard_threshold(noisy, noisy, curve)
    weights = (1.0, 1.7, 2.2)
    stack = wiener.collaborative_wiener(np.stack([noisy, noisy[::-1]]), np.stack([pilot, pilot[::-1]]), curve,
                                        deep_groups=deep, noise_scale=weights)
    one = wiener.collaborative_wiener(noisy, pilot, curve, deep_groups=deep, noise_scale=weights)
    assert stack.shape == (3, 2) + noisy.shape and one.shape == (3,) + noisy.shape
    for i, weight in enumerate(weights):
        alone = wiener.collaborative_wiener(noisy, pilot, curve, deep_groups=deep, noise_scale=weight)
        np.testing.assert_array_equal(stack[i, 0], alone)
        np.testing.assert_array_equal(one[i], alone)
    assert mse(one[0], one[2]) > 0


@pytest.mark.parametrize("options", [dict(passes=2), dict(correlated_noise=True), dict(noise_shape=True),
                                     dict(noise_scale=(1.0, -1.0)), dict(noise_scale=0.0), dict(noise_scale=())])
def test_the_wiener_filters_weights_of_the_noise_are_checked(options):
    noisy = np.random.default_rng(0).normal(0.5, 0.05, (40, 40))
    scales = options.pop("noise_scale", (1.0, 2.0))
    with pytest.raises(ValueError, match="weigh"):
        wiener.collaborative_wiener(noisy, noisy, noise_variance_curve(noisy), noise_scale=scales, **options)
