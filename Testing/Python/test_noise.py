"""Noise models, variance-stabilising transforms, noise estimation and normalisation, checked on statistics."""

import numpy as np
import pytest

from DiffDenoiseLib.noise import (NOISE_KINDS, add_noise, estimate_noise_sigma, estimate_transform_params,
                                  gaussian_kernel, get_transform, noise_variance_curve, refined_noise_curve,
                                  transform_from_dict)
from DiffDenoiseLib.normalization import Normalization

TRANSFORMS = {"none": {}, "anscombe": {"lam": 200.0}, "log": {"alpha": 100.0}, "rician": {"sigma": 0.05}}
# (transform, noise kind, level, dark clean value, bright clean value)
STABILISED = [("anscombe", "poisson", 200.0, 0.05, 0.8), ("log", "gamma", 100.0, 0.2, 0.9),
              ("rician", "rician", 0.05, 0.0, 0.8)]


def smooth_image(shape=(128, 128)):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]] / max(shape)
    return 0.2 + 0.6 * np.exp(-((yy - 0.5) ** 2 + (xx - 0.4) ** 2) / 0.1)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_transform_round_trips_exactly_including_values_below_zero(name):
    transform = get_transform(name, **TRANSFORMS[name])
    y = np.linspace(-0.05, 1.2, 20001)
    assert np.max(np.abs(transform.inverse(transform.forward(y)) - y)) < 1e-5
    again = transform_from_dict(transform.to_dict())
    assert again.to_dict() == transform.to_dict()
    assert np.array_equal(again.forward(y), transform.forward(y))
    assert np.all(np.diff(transform.forward(y)) > 0), "a VST must be strictly increasing"


@pytest.mark.parametrize("name,kind,level,dark,bright", STABILISED)
def test_transforms_make_the_noise_std_the_same_in_dark_and_bright_regions(name, kind, level, dark, bright):
    rng = np.random.default_rng(1)
    transform = get_transform(name, **TRANSFORMS[name])
    raw, stabilised = [], []
    for value in (dark, bright):
        clean = np.full(100_000, value)
        noisy = add_noise(clean, kind, level, rng)
        raw.append(np.std(noisy - clean))
        stabilised.append(np.std(transform.forward(noisy) - transform.forward(clean)))
    assert 0.8 < stabilised[0] / stabilised[1] < 1.2, stabilised
    assert not 0.8 < raw[0] / raw[1] < 1.2, raw


@pytest.mark.parametrize("name,kind,level,value", [("anscombe", "poisson", 200.0, 0.01),
                                                     ("log", "gamma", 10.0, 0.5),
                                                     ("rician", "rician", 0.05, 0.05)])
def test_bias_aware_inverse_recovers_the_mean_that_the_naive_inverse_misses(name, kind, level, value):
    params = {"lam": level} if name == "anscombe" else {"alpha": level} if name == "log" else {"sigma": level}
    transform = get_transform(name, **params)
    noisy = add_noise(np.full(400_000, value), kind, level, np.random.default_rng(2))
    ideal_denoised = transform.forward(noisy).mean()  # what a perfect denoiser of forward(y) outputs
    naive = abs(float(transform.inverse(ideal_denoised)) - value)
    aware = abs(float(transform.inverse_denoised(ideal_denoised)) - value)
    assert aware < 0.25 * naive, (naive, aware)
    assert aware < 0.02 * max(value, 0.05)


def test_anscombe_output_has_the_documented_noise_std():
    transform = get_transform("anscombe", lam=400.0)
    clean = np.full(100_000, 0.5)
    z = transform.forward(add_noise(clean, "poisson", 400.0, np.random.default_rng(3)))
    assert np.std(z) == pytest.approx(1.0 / (2.0 * np.sqrt(400.0)), rel=0.03)


def test_noise_kinds_have_the_documented_statistics():
    rng = np.random.default_rng(4)
    clean = np.full((40, 256, 256), 0.5)
    gaussian = add_noise(clean, "gaussian", 0.1, rng) - clean
    assert gaussian.std() == pytest.approx(0.1, rel=0.01) and abs(gaussian.mean()) < 1e-3
    poisson = add_noise(clean, "poisson", 200.0, rng)
    assert poisson.mean() == pytest.approx(0.5, rel=0.002) and poisson.var() == pytest.approx(0.5 / 200, rel=0.02)
    gamma = add_noise(clean, "gamma", 100.0, rng)
    assert gamma.mean() == pytest.approx(0.5, rel=0.002) and gamma.std() == pytest.approx(0.05, rel=0.01)
    rician = add_noise(np.zeros((256, 256)), "rician", 0.1, rng)  # Rayleigh: mean sigma sqrt(pi / 2)
    assert rician.mean() == pytest.approx(0.1 * np.sqrt(np.pi / 2), rel=0.01) and rician.min() >= 0
    for kernel in (0.5, 1.2):
        correlated = add_noise(clean, "correlated", kernel, rng, sigma=0.05) - clean
        assert correlated.std() == pytest.approx(0.05, rel=0.02)
        neighbour = np.corrcoef(correlated[..., :-1].ravel(), correlated[..., 1:].ravel())[0, 1]
        k = gaussian_kernel(kernel)  # filtered white noise: correlation at lag 1 is sum k_i k_i+1 / sum k_i^2
        assert neighbour == pytest.approx(np.sum(k[:-1] * k[1:]) / np.sum(k * k), abs=0.02)
        assert neighbour > (0.25 if kernel == 0.5 else 0.8)
        across_slices = np.corrcoef(correlated[:-1].ravel(), correlated[1:].ravel())[0, 1]
        assert abs(across_slices) < 0.01, "correlated noise is filtered in-plane only"


def test_unknown_noise_kind_and_transform_name_the_known_ones():
    with pytest.raises(ValueError, match="gaussian, poisson, gamma, correlated, rician"):
        add_noise(np.zeros((4, 4)), "speckle", 0.1, 0)
    with pytest.raises(ValueError, match="none, anscombe, log, rician"):
        get_transform("sqrt")
    with pytest.raises(ValueError, match="lam > 0"):
        get_transform("anscombe", lam=0)
    assert set(NOISE_KINDS) == {"gaussian", "poisson", "gamma", "correlated", "rician"}


def test_noise_sigma_estimate_is_within_ten_percent_on_a_smooth_image():
    clean = smooth_image()
    rng = np.random.default_rng(5)
    for sigma in (0.02, 0.1):
        assert estimate_noise_sigma(add_noise(clean, "gaussian", sigma, rng)) == pytest.approx(sigma, rel=0.1)
    volume = np.stack([clean] * 6)
    assert estimate_noise_sigma(add_noise(volume, "gaussian", 0.05, rng)) == pytest.approx(0.05, rel=0.1)
    assert estimate_noise_sigma(clean) < 0.002


def test_the_refined_curve_reads_the_noise_where_an_estimate_is_flat_not_on_edges():
    """A thin bright ring: its intensities are held mostly by partial-volume edge voxels, whose high-pass holds the
    ring, so the curve over-reads the noise there; read on the voxels where an estimate (the clean image) is flat,
    it comes near the truth. An estimate with no flat voxel gives the curve back; shapes must agree."""
    r = np.hypot(*(np.mgrid[:96, :96] - 48.0))
    clean = np.repeat((0.3 + 0.6 * np.exp(-((r - 36) / 1.2) ** 2))[None], 6, axis=0)
    sigma = 0.02
    noisy = add_noise(clean, "gaussian", sigma, np.random.default_rng(3))
    curve = noise_variance_curve(noisy)
    refined = refined_noise_curve(noisy, clean, curve)
    assert np.interp(0.6, *curve) > 2.0 * sigma ** 2
    assert np.interp(0.6, *refined) < 1.35 * sigma ** 2
    assert np.interp(0.3, *refined) == pytest.approx(sigma ** 2, rel=0.15)
    checkerboard = 0.5 + 0.3 * (np.indices(noisy.shape).sum(axis=0) % 2)
    assert refined_noise_curve(noisy, checkerboard, curve) is curve
    with pytest.raises(ValueError, match="noisy image .* and its estimate .* differ in shape"):
        refined_noise_curve(noisy, clean[:3], curve)


@pytest.mark.parametrize("name,kind,level,key", [("anscombe", "poisson", 300.0, "lam"),
                                                 ("log", "gamma", 100.0, "alpha"),
                                                 ("rician", "rician", 0.04, "sigma")])
def test_transform_parameters_are_estimated_from_the_noisy_image(name, kind, level, key):
    noisy = add_noise(smooth_image((160, 160)), kind, level, np.random.default_rng(6))
    assert estimate_transform_params(name, noisy)[key] == pytest.approx(level, rel=0.15)
    assert estimate_transform_params("none", noisy) == {}


def test_normalization_maps_percentiles_to_unit_range_and_inverts_exactly():
    data = np.random.default_rng(7).normal(40.0, 300.0, (8, 32, 32)).astype(np.float32)
    norm = Normalization.fit(data)
    y = norm.forward(data)
    assert np.percentile(y, 0.5) == pytest.approx(0.0, abs=1e-9)
    assert np.percentile(y, 99.5) == pytest.approx(1.0, abs=1e-9)
    assert np.max(np.abs(norm.inverse(y).astype(np.float32) - data)) <= 1e-6 * np.abs(data).max()
    assert Normalization.from_dict(norm.to_dict()) == norm
    sparse = np.zeros((64, 64))
    sparse[0, :4] = 5.0  # fewer than 0.5 % bright voxels: falls back on min / max
    assert Normalization.fit(sparse).scale == 5.0
    with pytest.raises(ValueError, match="constant .every voxel is 7.*no noise to remove"):
        Normalization.fit(np.full((5, 5), 7.0))


def test_binning_tells_strong_correlated_noise_from_white_noise_and_from_clean_anatomy():
    """On a real CT slice: white noise reads a ratio near 1, correlated noise far above 10 (a 0.5-pixel kernel's
    about 3, not white but kept from the correlated-noise model, as crops of clean scans read as much); the nearly
    noise-free slice itself reads a high ratio but a low strength, and must not count as correlated."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from DiffDenoiseLib.imageio import read_image
    from DiffDenoiseLib.noise import (CORRELATED_BINNING_RATIO, CORRELATED_CLEAR_MIN_STRENGTH, CORRELATED_CLEAR_RATIO,
                                      CORRELATED_MIN_STRENGTH, WHITE_NOISE_MAX_BINNING_RATIO, binning_noise_reading,
                                      noise_looks_correlated, reading_looks_correlated)

    hu = read_image(get_testdata_file("CT_small.dcm")).array.reshape(128, 128).astype(np.float64)
    low, high = np.percentile(hu, [0.5, 99.5])
    unit = np.clip((hu - low) / (high - low), 0, 1)
    rng = np.random.default_rng(11)
    for kind, level in (("gaussian", 25 / 255), ("gaussian", 6 / 255), ("poisson", 200), ("rician", 0.05)):
        noisy = add_noise(unit, kind, level, rng)
        assert binning_noise_reading(noisy)[0] < 5 and not noise_looks_correlated(noisy), (kind, level)
    for sigma in (0.15, 0.2):  # std as a fraction of the range; weaker correlated noise may be missed
        noisy = add_noise(unit, "correlated", 1.2, rng, sigma=sigma)
        ratio, strength = binning_noise_reading(noisy * 1000 - 300)  # units do not matter
        assert ratio > 2 * CORRELATED_BINNING_RATIO and strength > CORRELATED_MIN_STRENGTH
        assert noise_looks_correlated(noisy)
    for seed in (1, 2, 3, 4):  # clearly correlated (ratio about 100) but a little weaker than the first rule needs
        ratio, strength = binning_noise_reading(add_noise(unit, "correlated", 1.2, np.random.default_rng(seed),
                                                          sigma=0.085))
        assert ratio > CORRELATED_CLEAR_RATIO and CORRELATED_CLEAR_MIN_STRENGTH < strength < CORRELATED_MIN_STRENGTH
        assert reading_looks_correlated((ratio, strength))
    assert not reading_looks_correlated((CORRELATED_CLEAR_RATIO - 1, strength)), "anatomy reads ratios up to 30"
    ratio, strength = binning_noise_reading(hu)
    assert ratio > CORRELATED_BINNING_RATIO and strength < CORRELATED_MIN_STRENGTH / 2
    assert not noise_looks_correlated(hu), "a clean slice must keep the modality's model"
    assert noise_looks_correlated(np.stack([add_noise(unit, "correlated", 1.2, rng, sigma=0.2) for _ in range(3)]))
    for seed in (5, 6, 7):  # a 0.5-pixel kernel: not white (no fusion, no share), but it keeps the modality's model
        mild = add_noise(unit, "correlated", 0.5, np.random.default_rng(seed), sigma=0.1)
        ratio, strength = binning_noise_reading(mild)
        assert WHITE_NOISE_MAX_BINNING_RATIO < ratio < CORRELATED_BINNING_RATIO and not noise_looks_correlated(mild)
        strong_white = add_noise(unit, "gaussian", 0.15, np.random.default_rng(seed))
        assert binning_noise_reading(strong_white)[0] < WHITE_NOISE_MAX_BINNING_RATIO
    with pytest.raises(ValueError, match="too small to judge its noise"):
        binning_noise_reading(unit[:10, :40])
    with pytest.raises(ValueError, match="NaN or infinite voxels"):
        binning_noise_reading(np.where(unit > 0.5, np.inf, unit))
