"""Observation fusion and the noise variance curve it relies on, checked on statistics."""

import numpy as np
import pytest

from DiffDenoiseLib.fusion import (
    ANATOMY_EDGE_CORRELATION,
    FUSION_MARGINS,
    GIVE_BACK_SHARES,
    OBSERVATION_SHARES,
    choose_margin,
    choose_observation_share,
    fuse_unless_correlated,
    fuse_with_observation,
    looks_correlated,
    probe_step,
    removed_follows_edges,
)
from DiffDenoiseLib.noise import add_noise, noise_variance_curve


def phantom(size=128):
    """Smooth ramps with a bright square: flat regions and sharp edges."""
    x = np.add.outer(np.linspace(0.1, 0.6, size), np.linspace(0.0, 0.3, size))
    x[size // 4:size // 2, size // 4:size // 2] += 0.3
    return x


def mse(a, b):
    return float(np.mean((a - b) ** 2))


def test_noise_curve_recovers_an_additive_noise_level_at_every_intensity():
    clean = phantom(192)
    xs, ys = noise_variance_curve(add_noise(clean, "gaussian", 0.05, np.random.default_rng(0)))
    assert len(xs) >= 10 and np.all(np.diff(xs) > 0)
    assert np.sqrt(ys) == pytest.approx(np.full_like(ys, 0.05), rel=0.15)


def test_noise_curve_follows_poisson_noise_growing_with_intensity():
    clean = phantom(192)
    xs, ys = noise_variance_curve(add_noise(clean, "poisson", 200.0, np.random.default_rng(1)))
    slope = np.polyfit(xs, ys, 1)[0]
    assert slope == pytest.approx(1 / 200.0, rel=0.2)


def test_fusion_beats_both_the_estimate_and_the_observation_and_nears_the_optimum():
    rng = np.random.default_rng(2)
    clean = phantom()
    noisy = clean + rng.normal(0, 0.05, clean.shape)
    estimate = clean + rng.normal(0, 0.03, clean.shape)  # errors independent of the noise, as for a blind estimate
    before = noisy.copy(), estimate.copy()
    fused, weight = fuse_with_observation(noisy, estimate)
    assert np.array_equal(noisy, before[0]) and np.array_equal(estimate, before[1]), "inputs must not change"
    optimum = 0.05 ** 2 * 0.03 ** 2 / (0.05 ** 2 + 0.03 ** 2)
    assert mse(fused, clean) < 1.15 * optimum < mse(estimate, clean) < mse(noisy, clean)
    # the estimate is 2.8 times as reliable as the observation: it should get about 0.74 of the weight
    assert float(np.median(weight)) == pytest.approx(0.05 ** 2 / (0.05 ** 2 + 0.03 ** 2), abs=0.06)


def test_fusion_leans_on_the_observation_where_the_estimate_lost_structure():
    rng = np.random.default_rng(3)
    clean = phantom()
    noisy = clean + rng.normal(0, 0.02, clean.shape)
    estimate = clean.copy()
    patch = (slice(48, 80), slice(48, 80))  # straddles the bright square's corner
    estimate[patch] = clean[patch].mean()  # over-smoothed: the edge is gone
    fused, weight = fuse_with_observation(noisy, estimate)
    assert np.median(weight[patch]) < 0.3 < 0.9 < np.median(weight[96:, 96:])
    assert mse(fused[patch], clean[patch]) < 0.1 * mse(estimate[patch], clean[patch])


def test_a_noise_free_image_comes_back_unchanged_and_volumes_go_slice_by_slice():
    clean = phantom(64)
    fused, weight = fuse_with_observation(clean, clean + 0.01)
    assert np.allclose(fused, clean, atol=1e-6) and weight.max() < 1e-3
    noisy = add_noise(np.stack([clean, clean[::-1]]), "gaussian", 0.05, np.random.default_rng(4))
    curve = noise_variance_curve(noisy)
    volume, _ = fuse_with_observation(noisy, np.stack([clean, clean[::-1]]), curve=curve, margin=1.0)
    single, _ = fuse_with_observation(noisy[1], clean[::-1], curve=curve, margin=1.0)
    assert np.allclose(volume[1], single)


@pytest.mark.parametrize("estimate_error,noise", [(0.005, 0.1), (0.03, 0.05), (0.02, 0.02)])
def test_the_margin_stein_chooses_is_within_a_few_percent_of_the_best_one(estimate_error, noise):
    """Without a clean image, Stein's risk estimate picks a margin whose true error is close to the
    best candidate's. When the estimate is far better than the observation (strong noise) the
    candidates differ by less than the noise curve's own error, so the pick is rougher; but it is
    a wide margin, which more than halves the error the zero margin leaves by handing noise back."""
    rng = np.random.default_rng(8)
    clean = phantom(160)
    noisy = clean + rng.normal(0, noise, clean.shape)
    estimate = clean + rng.normal(0, estimate_error, clean.shape)
    curve = noise_variance_curve(noisy)
    errors = {margin: mse(fuse_with_observation(noisy, estimate, curve=curve, margin=margin)[0], clean)
              for margin in FUSION_MARGINS}
    chosen = choose_margin(noisy, estimate, curve)
    assert np.array_equal(fuse_with_observation(noisy, estimate, curve=curve)[0],
                          fuse_with_observation(noisy, estimate, curve=curve, margin=chosen)[0])
    if estimate_error / noise < 0.1:
        assert chosen >= 1.0 and errors[chosen] < 0.5 * errors[0.0]
    else:
        assert errors[chosen] < 1.05 * min(errors.values())


def test_correlated_noise_is_recognised_and_white_noise_or_a_biased_estimate_is_not():
    """Smooth noise hides from the high-pass: fused with the white-noise curve, the noise comes back."""
    clean = phantom(160)
    noisy = add_noise(clean, "correlated", 1.2, np.random.default_rng(5), sigma=0.05)
    estimate = clean + np.random.default_rng(6).normal(0, 0.015, clean.shape)
    assert looks_correlated(noisy, estimate)
    handed_back, _ = fuse_with_observation(noisy, estimate)
    assert mse(handed_back, clean) > 3 * mse(estimate, clean), "the reason fusion must be skipped"
    white = add_noise(clean, "gaussian", 0.05, np.random.default_rng(7))
    assert not looks_correlated(white, estimate)
    assert not looks_correlated(white, estimate + 0.1), "a bias of the estimate is not noise"
    assert not looks_correlated(white, white), "an estimate that removed nothing"
    kept, weight, correlated = fuse_unless_correlated(noisy, estimate)
    assert correlated and weight is None and np.array_equal(kept, estimate)
    fused, weight, correlated = fuse_unless_correlated(white, estimate)
    assert not correlated and np.array_equal(fused, fuse_with_observation(white, estimate)[0])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mildly_correlated_noise_that_the_residual_misses_is_not_fused(seed):
    """Noise of a 0.5-pixel kernel leaves a residual the high-pass curve nearly accounts for, but the image's
    binning reading, which keeps Fast's share from such noise, keeps fusion from it too."""
    clean = phantom(160)
    noisy = add_noise(clean, "correlated", 0.5, np.random.default_rng(seed), sigma=0.05)
    estimate = clean + np.random.default_rng(seed + 10).normal(0, 0.015, clean.shape)
    assert not looks_correlated(noisy, estimate)
    handed_back, _ = fuse_with_observation(noisy, estimate)
    assert mse(handed_back, clean) > 1.5 * mse(estimate, clean), "the reason fusion must be skipped"
    kept, weight, correlated = fuse_unless_correlated(noisy, estimate)
    assert correlated and weight is None and np.array_equal(kept, estimate)


@pytest.mark.parametrize("noisy,estimate,window,message", [
    (np.zeros((8, 8)), np.zeros((8, 9)), 9, "one 2D or 3D shape"),
    (np.zeros(8), np.zeros(8), 9, "one 2D or 3D shape"),
    (np.zeros((8, 8)), np.zeros((8, 8)), 4, "odd and at least 3"),
])
def test_bad_arguments_are_refused_with_a_reason(noisy, estimate, window, message):
    with pytest.raises(ValueError, match=message):
        fuse_with_observation(noisy, estimate, window=window)


def box_blur(a, r):
    """Mean over the (2r + 1)^2 window, wrapping around: a linear estimator whose dm_i/dy_i is 1 / (2r + 1)^2."""
    out = np.zeros_like(a)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out += np.roll(a, (dy, dx), axis=(0, 1))
    return out / (2 * r + 1) ** 2


def textured(size=128):
    y, x = np.mgrid[:size, :size]
    return phantom(size) + 0.08 * np.sin(x / 1.7) * np.cos(y / 2.3)


@pytest.mark.parametrize("image, sigma, radius, shares", [(textured, 0.01, 2, (0.3, 0.6)), (textured, 0.02, 1, (0.0, 0.6)),
                                                          (phantom, 0.1, 2, (0.0, 0.1))],
                         ids=["weak noise, fine texture", "moderate", "strong noise, smooth"])
def test_the_observation_share_stein_chooses_is_near_the_best_one(image, sigma, radius, shares):
    """An estimator that saw y (a box blur): Stein with a probed divergence picks a share whose error is within
    10 % of the best share's, keeping y where the blur wipes texture out and leaving it out under strong noise."""
    rng = np.random.default_rng(5)
    clean = image()
    noisy = clean + rng.normal(0, sigma, clean.shape)
    curve = noise_variance_curve(noisy)
    m = box_blur(noisy, radius)
    probe = rng.choice([-1.0, 1.0], size=noisy.shape)
    step = probe_step(curve)
    share = choose_observation_share(noisy, m, box_blur(noisy + step * probe, radius), probe, step, curve)
    errors = {a: mse(m + a * (noisy - m), clean) for a in OBSERVATION_SHARES}
    best = min(errors, key=errors.get)
    assert errors[share] <= 1.1 * errors[best], (share, best)
    assert shares[0] <= share <= shares[1]


@pytest.mark.parametrize("kept", [0.0, 0.5])
def test_the_probed_divergence_gives_the_choice_the_true_one_gives(kept):
    """For m = kept * y + (1 - kept) * box blur, dm_i/dy_i = kept + (1 - kept) / 9 exactly: the share chosen with
    the probe is the one the exact divergence gives, and an estimate that ignores y (a constant) takes the
    largest share."""
    rng = np.random.default_rng(6)
    estimator = lambda y: kept * y + (1 - kept) * box_blur(y, 1)  # noqa: E731
    chosen_shares = set()
    for sigma in (0.005, 0.01, 0.02, 0.05):
        noisy = textured() + rng.normal(0, sigma, (128, 128))
        curve = noise_variance_curve(noisy)
        m = estimator(noisy)
        probe = rng.choice([-1.0, 1.0], size=noisy.shape)
        step = probe_step(curve)
        chosen = choose_observation_share(noisy, m, estimator(noisy + step * probe), probe, step, curve)
        s = np.interp(m, *curve)
        residual, variance = np.sum((m - noisy) ** 2), np.sum(s)
        exact = [(1 - a) ** 2 * residual - variance + 2 * (a * variance + (1 - a) * variance * (kept + (1 - kept) / 9))
                 for a in OBSERVATION_SHARES]
        assert chosen == OBSERVATION_SHARES[int(np.argmin(exact))], sigma
        chosen_shares.add(chosen)
    assert len(chosen_shares) > 1  # the noise level moves the choice
    flat = np.full_like(noisy, noisy.mean())
    assert choose_observation_share(noisy, flat, flat, probe, step, curve) == max(OBSERVATION_SHARES)


def test_a_blind_estimates_share_needs_no_probe_and_one_that_took_anatomy_gets_most_of_the_input_back():
    """With no probe the estimate counts as blind to each voxel's own value (D = 0): the share is the argmin of
    (1 - a)^2 R - S + 2 a S. A blur of a nearly clean textured image took the texture, and what it removed follows
    the edges (a volume is read slice by slice); the true clean image as the estimate removed only the noise, which
    does not, and gets no share back."""
    rng = np.random.default_rng(8)
    clean = textured()
    noisy = clean + rng.normal(0, 0.003, clean.shape)
    curve = noise_variance_curve(noisy)
    blurred = box_blur(noisy, 2)
    share = choose_observation_share(noisy, blurred, None, None, None, curve, shares=GIVE_BACK_SHARES)
    residual, variance = np.sum((blurred - noisy) ** 2), np.sum(np.interp(blurred, *curve))
    risks = [(1 - a) ** 2 * residual - variance + 2 * a * variance for a in GIVE_BACK_SHARES]
    assert share == GIVE_BACK_SHARES[int(np.argmin(risks))] and share >= 0.8
    assert mse(blurred + share * (noisy - blurred), clean) < 0.1 * mse(blurred, clean)
    assert removed_follows_edges(np.stack([noisy] * 3), np.stack([blurred] * 3)) > 3 * ANATOMY_EDGE_CORRELATION
    assert abs(removed_follows_edges(noisy, clean)) < ANATOMY_EDGE_CORRELATION
    assert choose_observation_share(noisy, clean, None, None, None, curve, shares=GIVE_BACK_SHARES) == 0.0
