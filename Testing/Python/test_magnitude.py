"""The Rician bias of MR magnitude images: its law, its removal, and which images read as magnitude data."""

import numpy as np
import pytest

from DiffDenoiseLib.magnitude import (magnitude_noise_sigma, remove_rician_bias, rician_bias_sigma, rician_mean,
                                      rician_table)
from DiffDenoiseLib.noise import add_noise


def phantom() -> np.ndarray:
    """Two 96x96 slices: air (0) around an ellipse of tissue with a dark ventricle-like region and a smooth brighter
    rim, 0..1."""
    _, y, x = np.meshgrid(np.zeros(2), np.linspace(-1, 1, 96), np.linspace(-1, 1, 96), indexing="ij")
    r = np.sqrt((y / 0.85) ** 2 + (x / 0.7) ** 2)
    image = np.where(r < 1.0, 0.45 + 0.35 * r, 0.0)
    image = np.where(np.hypot(y - 0.1, x) < 0.25, 0.12, image)
    return image


def test_the_mean_follows_the_rice_law_drawn_by_monte_carlo():
    rng = np.random.default_rng(0)
    sigma = 0.05
    for nu in (0.0, 0.5 * sigma, 2 * sigma, 10 * sigma):
        draws = np.abs(nu + sigma * (rng.standard_normal(400_000) + 1j * rng.standard_normal(400_000)))
        assert rician_mean(nu, sigma) == pytest.approx(draws.mean(), rel=2e-3)
    assert rician_mean(0.0, 2.0) == pytest.approx(2.0 * np.sqrt(np.pi / 2))
    _, mean, variance = rician_table()
    assert variance[0] == pytest.approx(2 - np.pi / 2) and variance[-1] == pytest.approx(1.0, abs=1e-3)
    assert np.all(np.diff(mean) > 0)


def test_removing_the_bias_inverts_the_mean_and_keeps_the_input():
    sigma = 3.0
    nu = np.array([0.0, 0.3, 1.0, 2.5, 7.0, 40.0, 150.0, 400.0]) * sigma  # beyond the table too
    m = rician_mean(nu, sigma)
    before = m.copy()
    np.testing.assert_allclose(remove_rician_bias(m, sigma)[2:], nu[2:], rtol=2e-3)
    assert np.array_equal(m, before)
    # at and below the floor (sigma sqrt(pi/2)) the signal is 0; negative estimates too
    assert np.all(remove_rician_bias(np.array([-1.0, 0.0, 1.2 * sigma]), sigma) == 0.0)
    with pytest.raises(ValueError, match="sigma"):
        remove_rician_bias(m, 0.0)


def test_rician_noise_on_a_magnitude_phantom_reads_as_magnitude_data_with_its_sigma():
    rng = np.random.default_rng(1)
    noisy = add_noise(phantom(), "rician", 0.05, rng) * 1000.0  # in scanner-like units
    for modality in ("MR", None):
        assert magnitude_noise_sigma(noisy, modality) == pytest.approx(50.0, rel=0.1)
    for modality in ("CT", "CR", "PT"):
        assert magnitude_noise_sigma(noisy, modality) is None


def test_noise_that_is_not_rician_does_not_read_as_magnitude_data():
    rng = np.random.default_rng(2)
    clean = phantom()
    gaussian = add_noise(clean, "gaussian", 0.05, rng)  # reaches below 0 in the air
    assert gaussian.min() < 0 and magnitude_noise_sigma(gaussian, "MR") is None
    for kind, level in (("poisson", 200), ("gamma", 100)):  # their variance grows with intensity
        assert magnitude_noise_sigma(add_noise(clean + 0.02, kind, level, rng), "MR") is None, kind
    correlated = np.abs(add_noise(clean, "correlated", 1.2, rng, sigma=0.1))  # as strong as the benchmark's
    assert magnitude_noise_sigma(correlated, "MR") is None
    with_nan = add_noise(clean, "rician", 0.05, rng)
    with_nan[0, 3, 3] = np.nan
    assert magnitude_noise_sigma(with_nan, "MR") is None


def test_poisson_and_gamma_noise_on_a_magnitude_image_do_not_read_as_magnitude_data():
    """A real MR image carries Rician noise of its own, which flattens the variance's growth with intensity that
    tells Poisson and Gamma noise apart in tissue; their dark voxels still read far below Rician noise's floor."""
    for kind, level in (("poisson", 700), ("poisson", 200), ("gamma", 500)):
        for seed in range(4):
            rng = np.random.default_rng(seed)
            image = add_noise(add_noise(phantom(), "rician", 0.02, rng), kind, level, rng) * 1000.0
            assert magnitude_noise_sigma(image, "MR") is None, (kind, seed)


def test_a_masked_background_does_not_hide_magnitude_data():
    """Skull-stripped or masked magnitude images hold exact zeros outside the mask: no noise to read there."""
    clean = phantom()
    for seed in range(4):
        masked = add_noise(clean, "rician", 0.05, np.random.default_rng(seed)) * 1000.0
        masked[clean == 0] = 0.0
        assert magnitude_noise_sigma(masked, "MR") == pytest.approx(50.0, rel=0.15)
    assert magnitude_noise_sigma(np.zeros((2, 64, 64)), "MR") is None


def test_the_modes_choose_when_the_bias_is_removed():
    rng = np.random.default_rng(3)
    rician = add_noise(phantom(), "rician", 0.05, rng)
    gaussian = add_noise(phantom(), "gaussian", 0.05, rng)
    assert rician_bias_sigma(rician, "MR") == pytest.approx(0.05, rel=0.1)
    assert rician_bias_sigma(rician, "MR", "keep") is None
    assert rician_bias_sigma(gaussian, "MR") is None
    assert rician_bias_sigma(gaussian, "CT", "remove") == pytest.approx(0.05, rel=0.15)
    with pytest.raises(ValueError, match="unknown Rician bias mode"):
        rician_bias_sigma(rician, "MR", "sometimes")
    with pytest.raises(ValueError, match="too little of the image"):
        rician_bias_sigma(np.random.default_rng(4).random((32, 32)) * 0.01 + 100.0 * (np.arange(32) > 30), "MR",
                          "remove")


def test_real_scans_read_as_magnitude_data_only_where_they_are():
    """The shoulder MRI of pydicom-data (a real magnitude image) reads as such; the head CT (below 0) and the
    chest radiograph (Poisson-like noise, growing with intensity) do not, even with their modality unknown."""
    from DiffDenoiseLib.datasets import pydicom_file

    shoulder = pydicom_file("MR2_UNCR.dcm")
    assert shoulder.modality == "MR" and 15.0 < magnitude_noise_sigma(shoulder.array, "MR") < 30.0
    for name in ("693_UNCR.dcm", "RG1_UNCR.dcm"):
        assert magnitude_noise_sigma(pydicom_file(name).array, None) is None, name
