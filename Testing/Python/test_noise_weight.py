"""The 2D Wiener step's weight of the noise, chosen per image by Recorrupted-to-Recorrupted (noise_weight.py)."""
import numpy as np
import pytest

from DiffDenoiseLib import datasets, noise_weight, wiener
from DiffDenoiseLib.noise import noise_variance_curve
from DiffDenoiseLib.pipeline import white_noise_pilot_2d


def test_a_recorrupted_pairs_noises_are_uncorrelated_and_as_loud_as_alpha_says():
    rng = np.random.default_rng(0)
    clean = np.zeros((400, 400))
    noisy = clean + rng.normal(0.0, 0.1, clean.shape)
    kept = noisy.copy()
    first, second = noise_weight.recorrupted_pair(noisy, np.full(noisy.shape, 0.01), 0.5, rng)
    np.testing.assert_array_equal(noisy, kept)
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.01
    assert first.var() == pytest.approx(0.01 * 1.25, rel=0.02)
    assert second.var() == pytest.approx(0.01 * 5.0, rel=0.02)


@pytest.mark.parametrize("shape, windows", [
    ((100, 80), [(slice(0, 100), slice(0, 80))]),
    ((512, 512), [(slice(r, r + 128), slice(c, c + 128)) for r in (64, 320) for c in (64, 320)]),
    ((300, 128), [(slice(11, 139), slice(0, 128)), (slice(161, 289), slice(0, 128))]),
    ((160, 160), [(slice(r, r + 128), slice(c, c + 128)) for r in (0, 32) for c in (0, 32)]),
])
def test_the_probe_crops_lie_on_the_images_quarters_within_it(shape, windows):
    assert noise_weight.probe_crops(shape) == windows


def test_choosing_the_weight_checks_its_settings():
    slices = np.zeros((1, 32, 32))
    curve = (np.array([0.0, 1.0]), np.array([0.01, 0.01]))
    for wrong in (dict(probes=0), dict(alpha=0.0), dict(scales=())):
        with pytest.raises(ValueError, match="choosing the noise's weight"):
            noise_weight.choose_noise_scale(slices, curve, lambda y, c: y, **wrong)


def real_slice(name: str, rows: slice, cols: slice, factor: int) -> np.ndarray:
    """A crop of a real pydicom-data image averaged over `factor` x `factor` pixels, on [0, 1] (skips where the
    data is missing)."""
    try:
        array = datasets.pydicom_file(name).array[0].astype(np.float64)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    h, w = (s // factor * factor for s in array.shape)
    array = array[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    low, high = np.percentile(array, [0.5, 99.5])
    return np.clip((array[rows, cols] - low) / (high - low), 0.0, 1.0)


def hard_threshold_pilot(y: np.ndarray, curve) -> np.ndarray:
    return white_noise_pilot_2d(y, wiener.collaborative_hard_threshold(y, y, curve), curve)


@pytest.mark.parametrize("name, rows, cols, factor, chosen", [
    ("693_UNCR.dcm", slice(64, 160), slice(0, 96), 2, lambda scale: scale >= 1.7),
    ("RG1_UNCR.dcm", slice(120, 216), slice(60, 156), 4, lambda scale: scale <= 1.3),
], ids=["head CT", "chest radiograph"])
def test_on_real_images_the_chosen_weight_comes_near_the_best_and_follows_the_anatomy(name, rows, cols, factor,
                                                                                     chosen):
    """A head CT's flat tissue wants the noise weighed more than once, a chest radiograph's lung texture about once:
    the weight chosen on the image alone (its hard-thresholding pilot, Fast's groups) is the anatomy's, and its error
    from the clean image comes within 2 % of the best weight's."""
    clean = real_slice(name, rows, cols, factor)
    noisy = clean[None] + np.random.default_rng(5).normal(0.0, 25 / 255, (1,) + clean.shape)
    curve = noise_variance_curve(noisy)
    scale, distance = noise_weight.choose_noise_scale(noisy, curve, hard_threshold_pilot, deep_groups=False)
    assert distance.shape == (len(noise_weight.NOISE_SCALES),) and chosen(scale)
    pilot = hard_threshold_pilot(noisy, curve)
    errors = {s: np.mean((wiener.collaborative_wiener(noisy, pilot, curve, deep_groups=False, noise_scale=s)[0]
                          - clean) ** 2) for s in noise_weight.NOISE_SCALES}
    assert errors[scale] <= 1.02 * min(errors.values())
