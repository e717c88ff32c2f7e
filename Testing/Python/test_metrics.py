"""PSNR/SSIM against scikit-image, masks, and method-noise statistics that expose removed edges."""

import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from DiffDenoiseLib.metrics import flat_region_bias, method_noise_stats, psnr, ssim
from DiffDenoiseLib.noise import add_noise, correlate_valid, gaussian_kernel


def phantom(shape=(96, 112)):
    """Piecewise-constant discs and a ramp: sharp edges plus smooth variation."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    image = 0.2 + 0.3 * xx / shape[1]
    image[(yy - 40) ** 2 + (xx - 50) ** 2 < 25 ** 2] = 0.8
    image[(yy - 60) ** 2 + (xx - 70) ** 2 < 10 ** 2] = 0.4
    return image


def blur(image, sigma=2.0):
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    padded = np.pad(image, r, mode="reflect")
    return correlate_valid(correlate_valid(padded, k, -1), k, -2)


@pytest.fixture
def pair():
    clean = phantom()
    return clean, add_noise(clean, "gaussian", 0.08, np.random.default_rng(0))


def test_psnr_matches_skimage_and_is_infinite_for_identical_images(pair):
    clean, noisy = pair
    assert psnr(clean, noisy, data_range=1.0) == pytest.approx(
        peak_signal_noise_ratio(clean, noisy, data_range=1.0), abs=1e-3)
    assert psnr(clean, noisy) == pytest.approx(peak_signal_noise_ratio(clean, noisy, data_range=np.ptp(clean)),
                                               abs=1e-3)
    assert psnr(clean, noisy, data_range=1.0) == pytest.approx(-20 * math.log10(0.08), abs=0.1)
    assert psnr(clean, clean.copy()) == math.inf


def test_ssim_matches_skimage_gaussian_weights_for_images_and_slice_by_slice_for_volumes(pair):
    clean, noisy = pair
    options = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    expected = structural_similarity(clean, noisy, **options)
    assert ssim(clean, noisy, data_range=1.0) == pytest.approx(expected, abs=1e-3)
    assert 0.2 < expected < 0.9
    assert ssim(clean, clean, data_range=1.0) == pytest.approx(1.0, abs=1e-12)
    volume_clean = np.stack([clean, clean[::-1], clean[:, ::-1]])
    volume_noisy = add_noise(volume_clean, "gaussian", 0.05, np.random.default_rng(1))
    per_slice = np.mean([structural_similarity(c, n, **options) for c, n in zip(volume_clean, volume_noisy)])
    assert ssim(volume_clean, volume_noisy, data_range=1.0) == pytest.approx(per_slice, abs=1e-3)


def test_masks_restrict_psnr_and_ssim_to_their_voxels(pair):
    clean, _ = pair
    estimate = clean.copy()
    left = np.zeros(clean.shape, dtype=bool)
    left[:, :56] = True
    estimate[:, 56:] += 0.1  # error only outside the mask
    assert psnr(clean, estimate, data_range=1.0, mask=left) == math.inf
    assert psnr(clean, estimate, data_range=1.0, mask=~left) == pytest.approx(20.0, abs=1e-9)
    far_left = np.zeros(clean.shape, dtype=bool)
    far_left[:, :45] = True  # windows of these voxels end before column 56
    assert ssim(clean, estimate, data_range=1.0, mask=far_left) == pytest.approx(1.0, abs=1e-12)
    _, full = structural_similarity(clean, estimate, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=1.0, full=True)
    inner = np.zeros(clean.shape, dtype=bool)
    inner[5:-5, 5:-5] = True
    assert ssim(clean, estimate, data_range=1.0, mask=~left) == pytest.approx(full[~left & inner].mean(), abs=1e-3)
    with pytest.raises(ValueError, match="mask is empty"):
        psnr(clean, estimate, mask=np.zeros(clean.shape, dtype=bool))


def test_method_noise_of_a_blurring_estimate_correlates_with_edges(pair):
    clean, noisy = pair
    ideal = method_noise_stats(noisy, clean, clean=clean)  # exactly the noise removed
    blurred = method_noise_stats(noisy, blur(noisy), clean=clean)
    assert ideal["std"] == pytest.approx(0.08, rel=0.05) and abs(ideal["mean"]) < 0.005
    assert abs(ideal["edge_correlation"]) < 0.05
    assert blurred["edge_correlation"] > ideal["edge_correlation"] + 0.15
    assert method_noise_stats(noisy, blur(noisy))["edge_reference"] == "denoised"


def test_method_noise_in_units_of_signal_dependent_noise_no_longer_follows_bright_edges():
    """Gamma noise is larger in bright tissue, here the textured half: removing exactly the noise correlates with
    the texture's edges, unless the method noise is divided by the noise's std; a blurred estimate still
    correlates after the division."""
    yy, xx = np.mgrid[0:96, 0:112]
    clean = np.where(xx < 56, 0.05, 0.6 + 0.3 * np.sin(xx / 3.0) * np.cos(yy / 4.0))
    noisy = add_noise(clean, "gamma", 25, np.random.default_rng(1))
    std = clean / 5.0
    raw = method_noise_stats(noisy, clean, clean=clean)["edge_correlation"]
    assert raw > 0.3
    assert abs(method_noise_stats(noisy, clean, clean=clean, noise_std=std)["edge_correlation"]) < 0.05
    assert method_noise_stats(noisy, blur(noisy), clean=clean, noise_std=std)["edge_correlation"] > 0.15
    assert method_noise_stats(noisy, clean, clean=clean, noise_std=0.1)["edge_correlation"] == pytest.approx(raw)
    with pytest.raises(ValueError, match="standard deviation must be positive"):
        method_noise_stats(noisy, clean, clean=clean, noise_std=np.where(clean > 0.5, std, 0.0))


def test_flat_region_bias_is_the_mean_shift_inside_the_mask(pair):
    clean, noisy = pair
    disc = np.zeros(clean.shape, dtype=bool)
    disc[30:50, 40:60] = True  # inside the bright disc
    assert flat_region_bias(clean, clean + 0.03, disc) == pytest.approx(0.03, abs=1e-12)
    assert abs(flat_region_bias(clean, noisy, disc)) < 0.08 * 3 / 20  # 3 standard errors of a 400-voxel mean
