"""The benchmark harness (benchmarks/): noise suite, peers, our modes' unit round trip, report, cost. Seconds."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from DiffDenoiseLib.imageio import Image
from DiffDenoiseLib.metrics import psnr
from DiffDenoiseLib.networks import NetworkConfig
from DiffDenoiseLib.pipeline import DenoisingModel, SamplingConfig

from benchmarks import ours, report
from benchmarks.measure import measured
from benchmarks.oracle import train_oracle
from benchmarks.peers import PEERS, Condition, available_peers, stabilised, stabilising_transform, tuned
from benchmarks.run_benchmark import (antithetic_draws, described, flat_bias_over_pairs, masks, neighbour_offset,
                                      reference_noise_std, selected_noises)
from benchmarks.suite import NOISES, QUICK_NOISES, Case, correlated_psd, crop_box, image_case, noises_for


def toy_image(size=96):
    """A smooth disc with a bright square: edges and flat regions, values in [0.1, 0.9]."""
    y, x = np.mgrid[:size, :size] / size
    image = 0.1 + 0.5 * (((y - 0.5) ** 2 + (x - 0.5) ** 2) < 0.12)
    image[size // 3:size // 2, size // 3:size // 2] = 0.9
    return image


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: n.label)
def test_noise_suite_has_the_documented_levels(noise):
    rng = np.random.default_rng(0)
    flat = np.full((256, 256), 0.5)
    noisy = noise.apply(flat, rng)
    expected = {"gaussian": noise.level, "poisson": np.sqrt(0.5 / noise.level), "gamma": 0.5 / np.sqrt(noise.level),
                "correlated": 0.1, "rician": noise.level}[noise.kind]
    assert np.std(noisy) == pytest.approx(expected, rel=0.08)
    assert noise.std(flat) == pytest.approx(np.full(flat.shape, expected), rel=1e-9)
    if noise.kind == "correlated":  # neighbours correlate, more for the wider kernel
        r = np.corrcoef(noisy[:, :-1].ravel(), noisy[:, 1:].ravel())[0, 1]
        assert r > (0.2 if noise.level < 1 else 0.6)


def test_signal_dependent_noise_std_follows_the_intensity_and_is_floored_in_black():
    clean = np.array([0.0, 0.005, 0.04, 0.64])
    poisson, gamma, gaussian = (next(n for n in NOISES if n.label == label)
                                for label in ("poisson 200", "gamma 100", "gaussian 25/255"))
    np.testing.assert_allclose(poisson.std(clean), np.sqrt(np.array([0.01, 0.01, 0.04, 0.64]) / 200))
    np.testing.assert_allclose(gamma.std(clean), np.array([0.01, 0.01, 0.04, 0.64]) / 10)
    np.testing.assert_allclose(gaussian.std(clean), np.full(4, 25 / 255))


def test_quick_subset_and_rician_only_on_mr():
    labels = {n.label for n in NOISES}
    assert set(QUICK_NOISES) <= labels
    # a setting added to the quick list comes last, so the earlier settings keep their place and their draws
    assert [n.label for n in noises_for("MR", quick=True)] == list(QUICK_NOISES)
    assert [n.label for n in noises_for("CT", quick=True)][:5] == list(QUICK_NOISES[:5])
    assert "rician 0.05" in {n.label for n in noises_for("MR", quick=True)}
    assert "rician 0.05" not in {n.label for n in noises_for("CT", quick=False)}
    assert len(noises_for("CT", quick=False)) == 8


def test_a_run_limited_to_some_noises_seeds_them_as_the_whole_run_does():
    """Each noise's draws are seeded by its index in the whole suite, not in the run's filtered list."""
    whole = selected_noises("MR", True, None)
    assert [i for i, _ in whole] == list(range(len(noises_for("MR", quick=True))))
    limited = selected_noises("MR", True, ["rician 0.05", "correlated 1.2"])
    assert [(i, n.label) for i, n in limited] == [(4, "correlated 1.2"), (5, "rician 0.05")]
    assert selected_noises("CT", True, ["rician 0.05"]) == []


def test_correlated_psd_carries_the_noise_variance():
    psd = correlated_psd((64, 48), 1.2)
    assert np.mean(psd) / (64 * 48) == pytest.approx(0.1 ** 2, rel=1e-6)
    assert correlated_psd((4, 64, 48), 1.2).shape == (4, 64, 48)


def test_crop_box_is_centred_on_the_foreground_and_inside_the_image():
    mask = np.zeros((100, 80), bool)
    mask[70:90, 60:75] = True
    ys, xs = crop_box(mask, 32)
    assert (ys.stop - ys.start, xs.stop - xs.start) == (32, 32)
    assert ys.stop <= 100 and xs.stop == 80 and ys.start <= 70


@pytest.mark.parametrize("noise", [NOISES[1], NOISES[7]], ids=lambda n: n.label)  # white, and coloured (PSD)
@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.name)
def test_every_available_peer_improves_a_noisy_toy_image(peer, noise):
    if peer.name not in {p.name for p in available_peers()[0]}:
        pytest.skip(f"optional package {peer.package} is not installed")
    rng = np.random.default_rng(1)
    clean = toy_image()
    noisy = noise.apply(clean, rng)
    slab = np.stack([noise.apply(clean, rng) for _ in range(8)])  # BM4D's blocks need 8 slices
    slab[4] = noisy
    pairs = [(clean[:48, :48], noise.apply(clean[:48, :48], rng))]
    out = peer.run(noisy, Condition(noise, float(np.std(noisy - clean)), slab, pairs))
    assert psnr(clean, out, data_range=1.0) > psnr(clean, noisy, data_range=1.0) + 3.0


def halves_mean(noisy, cond):
    """A stand-in Gaussian denoiser: each half's mean, the most a denoiser can do on a two-level image."""
    out = np.empty_like(noisy)
    out[:, :64], out[:, 64:] = noisy[:, :64].mean(), noisy[:, 64:].mean()
    return out


@pytest.mark.parametrize("kind", ["poisson", "gamma", "rician"])
def test_under_signal_dependent_noise_a_gaussian_peer_runs_inside_the_vst_told_the_stabilised_std(kind):
    """Inside the VST the stand-in is told the std that the noise really has there, gets the slab transformed, and
    its result comes back without the bias of the transform (Gamma: the log's mean, -1/(2 alpha); Rician: the
    floor sigma sqrt(pi / 2) in the black half, which the stand-in on the magnitude keeps)."""
    seen = []

    def stand_in(noisy, cond):
        seen.append((cond.sigma, None if cond.slab is None else cond.slab.shape))
        return halves_mean(noisy, cond)

    noise = next(n for n in NOISES if n.kind == kind)
    clean = np.zeros((128, 128))
    clean[:, 64:] = 0.5
    noisy = noise.apply(clean, np.random.default_rng(2))
    slab = np.stack([noisy] * 8)
    cond = Condition(noise, float(np.std(noisy - clean)), slab)
    out = stabilised(stand_in)(noisy, cond)
    transform, std = stabilising_transform(noise)
    bright = transform.forward(noisy[:, 64:]) - transform.forward(clean[:, 64:])
    assert std == pytest.approx(float(np.std(bright)), rel=0.05)
    assert seen[-1] == (std, slab.shape)
    # the bright half's level comes back within two standard errors of the raw mean
    tolerance = 2 * np.std(noisy[:, 64:]) / 64
    assert out[:, 64:].mean() == pytest.approx(0.5, abs=tolerance)
    if kind == "gamma":  # the algebraic inverse keeps the log's bias, about three standard errors
        assert transform.inverse(transform.forward(noisy[:, 64:]).mean()) < 0.5 - tolerance
    if kind == "rician":
        assert halves_mean(noisy, cond)[:, :64].mean() == pytest.approx(noise.level * np.sqrt(np.pi / 2), rel=0.05)
        assert abs(out[:, :64].mean()) < 0.15 * noise.level


@pytest.mark.parametrize("works_inside", [True, False])
def test_a_tuned_peer_runs_inside_the_vst_only_where_its_training_regions_prefer_it(works_inside):
    """The stand-in denoises (each half's mean) only on one side of the transform and hands the image back on the
    other; the side that scores better on the training pairs is the one the test slice gets."""
    noise = next(n for n in NOISES if n.kind == "gamma")
    transform, std = stabilising_transform(noise)

    def stand_in(image, sigma, setting):
        inside = sigma == std
        return halves_mean(image, None) if inside == works_inside else image

    clean = np.zeros((128, 128))
    clean[:, 64:] = 0.5
    rng = np.random.default_rng(4)
    noisy = noise.apply(clean, rng)
    cond = Condition(noise, float(np.std(noisy - clean)), None, [(clean, noise.apply(clean, rng)) for _ in range(2)])
    out = tuned(stand_in, {"unused": (1,)})(noisy, cond)
    if works_inside:  # the transform's way back: the bright half's level without the log's bias
        assert out[:, 64:].mean() == pytest.approx(0.5, abs=2 * np.std(noisy[:, 64:]) / 64)
        assert np.ptp(out[:, 64:]) < 1e-6 and not np.array_equal(out, halves_mean(noisy, None))
    else:
        assert np.array_equal(out, halves_mean(noisy, None))


def test_under_additive_noise_a_gaussian_peer_runs_as_it_is():
    clean = np.zeros((128, 128))
    for noise in (n for n in NOISES if n.kind in ("gaussian", "correlated")):
        noisy = noise.apply(clean, np.random.default_rng(3))
        cond = Condition(noise, 0.1)
        assert stabilising_transform(noise) is None
        assert np.array_equal(stabilised(halves_mean)(noisy, cond), halves_mean(noisy, cond))


def test_missing_optional_peer_is_reported_with_the_reason():
    ready, missing = available_peers([type(PEERS[0])("imaginary", PEERS[0].run, "no_such_package_xyz")])
    assert not ready and "no_such_package_xyz" in missing["imaginary"]


def tiny_case(clean):
    return Case("toy", "CT", "HU", offset=-1000.0, scale=2000.0, clean=clean[None], slabs=None)


def test_our_modes_go_through_the_scanner_units_and_back():
    """An untrained student returns its input: Fast without fusion (whose Wiener filter would smooth a 2D model's
    result) must then hand back the noisy slice on the [0, 1] scale."""
    config = NetworkConfig(bsn_width=8, bsn_depth=1, unet_base=8, unet_mults=(1,), student_width=8)
    model = DenoisingModel.build(config, SamplingConfig(steps=2, t_start=50, fusion=False),
                                 {"name": "toy", "transform": {"name": "none"}})
    clean = toy_image(48)
    noisy = NOISES[1].apply(clean, np.random.default_rng(2))
    out, spread, _ = ours.run_mode("fast", model.eval(), tiny_case(clean), noisy, None)
    assert spread is None
    np.testing.assert_allclose(out, noisy, atol=1e-4)
    full, spread, _ = ours.run_mode("full", model, tiny_case(clean), noisy, None)
    assert full.shape == noisy.shape and spread is not None and np.all(spread >= 0)


def test_a_2_5d_model_denoises_only_the_test_slice_of_a_slab():
    """An untrained student returns its input: Fast without fusion (and so without the Wiener filter, which would
    smooth it) on a slab must hand back its centre slice, not a neighbour."""
    config = NetworkConfig(context_slices=1, bsn_width=8, bsn_depth=1, unet_base=8, unet_mults=(1,), student_width=8)
    model = DenoisingModel.build(config, SamplingConfig(steps=2, t_start=50, fusion=False),
                                 {"name": "toy", "transform": {"name": "none"}})
    clean = toy_image(48)
    rng = np.random.default_rng(5)
    slab = np.stack([NOISES[1].apply(clean + 0.05 * i, rng) for i in range(5)])
    out, _, made_by = ours.run_mode("fast", model.eval(), tiny_case(clean), slab[2], slab)
    assert out.shape == clean.shape
    np.testing.assert_allclose(out, slab[2], atol=1e-4)
    assert made_by is None  # no fusion, no filter
    full, spread, _ = ours.run_mode("full", model, tiny_case(clean), slab[2], slab)
    assert full.shape == spread.shape == clean.shape


@pytest.mark.parametrize("made_by", ["volumetric filter", None])
def test_modes_the_volumetric_filter_made_run_it_once_and_report_its_time_per_run(monkeypatch, made_by):
    """Where a fused mode's image is the volumetric filter's, the later fused modes with its groups take it (two
    samples at twice the time; Fast's groups are shallower, so it runs); elsewhere, or without fusion, each mode
    runs, but two samples take one sample's run (seed 0) as their first and run only the second (seed 1)."""
    ran = []

    def run_mode(mode, *args, seed=0):
        ran.append((mode, seed))
        return np.full((2, 2), float(len(ran))), None, None if mode.endswith("-unfused") else made_by

    monkeypatch.setattr(ours, "run_mode", run_mode)
    monkeypatch.setattr(ours, "measured", lambda call: (call(), 3.0, 10.0))
    results = ours.measured_modes(ours.MODES, None, None, None, None)
    assert list(results) == list(ours.MODES)
    if made_by is None:
        assert ran == [(m, 0) for m in ours.MODES[:3]] + [("single", 1)] + [(m, 0) for m in ours.MODES[4:]]
        # the average of one sample's run (the 3rd) and seed 1's (the 4th)
        np.testing.assert_array_equal(results["two-samples"][0][0], np.full((2, 2), 3.5))
        assert results["two-samples"][1:] == (6.0, 10.0)
        assert not ours.fast_image_is_the_oracles(results["fast"])
        return
    assert ran == [("bsn", 0), ("single-unfused", 0), ("full-unfused", 0), ("fast", 0)]
    for mode in ("single", "two-samples", "full"):
        assert results[mode][0] is results["bsn"][0], mode
    assert results["fast"][0] is not results["bsn"][0]
    assert [results[m][1] for m in ("bsn", "single", "two-samples", "full", "fast")] == [3.0, 3.0, 6.0, 3.0, 3.0]
    assert results["full"][2] == 10.0
    assert ours.fast_image_is_the_oracles(results["fast"])


def test_two_samples_measured_after_one_sample_are_the_two_samples_run_alone():
    """Taking one sample's run as the first of two changes nothing: the average of seeds 0 and 1, as run alone."""
    model = toy_model()
    clean = toy_image(48)
    noisy = NOISES[1].apply(clean, np.random.default_rng(6))
    measured_two = ours.measured_modes(("single", "two-samples"), model, tiny_case(clean), noisy, None)
    alone, _, _ = ours.run_mode("two-samples", model, tiny_case(clean), noisy, None)
    one, _, _ = measured_two["single"][0]
    two, spread, _ = measured_two["two-samples"][0]
    np.testing.assert_allclose(two, alone, atol=1e-12)
    assert spread is None and not np.allclose(two, one, atol=1e-4)  # seed 1's sample differs from seed 0's


def test_where_the_volumetric_filter_made_fasts_image_the_oracles_is_the_same():
    """The oracle's networks do not run where the volumetric filter makes the image: its image is Fast's, bit for
    bit, so the benchmark takes Fast's (`ours.fast_image_is_the_oracles`) instead of training it."""
    clean = toy_image(48)
    slab = np.stack([clean] * 8)
    case = Case("toy", "CT", "HU", offset=-1000.0, scale=2000.0, clean=clean[None], slabs=slab[None],
                train=[clean], train_slabs=[slab])
    model = toy_model(context=2)
    noisy_slab = NOISES[1].apply(slab, np.random.default_rng(7))
    fast = ours.measured_modes(("fast",), model, case, noisy_slab[4], noisy_slab)["fast"]
    assert ours.fast_image_is_the_oracles(fast)
    oracle = train_oracle(model, case, NOISES[1], steps=2, batch=2, patch=32)
    out, _, _ = ours.run_mode("fast", oracle, case, noisy_slab[4], noisy_slab)
    np.testing.assert_array_equal(out, fast[0][0])


def test_a_crop_inside_the_head_is_all_body_and_its_flat_tissue_is_soft_tissue():
    """Otsu on a crop with no air would call only the bone foreground; the body comes from the whole slice."""
    yy, xx = np.mgrid[:256, :256]
    radius = np.hypot(yy - 128, xx - 128)
    hu = np.where(radius < 110, 1000.0, -1000.0)  # skull
    hu[radius < 100] = 30.0  # brain
    hu[120:136, 100:156] = 1000.0  # a bone inside the crop
    hu[radius >= 110] += np.random.default_rng(0).normal(0, 3, int(np.sum(radius >= 110)))  # air, not padding
    case = image_case("head", Image(array=hu.astype(np.float32), modality="CT"), "HU", crop=64, source="")
    assert case.body.shape == case.clean.shape and case.body[0].all()
    fg, flat = masks(case.clean[0], case.body[0])
    assert flat is not None and flat.sum() > 500
    assert np.abs(case.to_units(case.clean[0][flat]) - 30.0).max() < 20.0, "flat tissue must be brain, not bone"


def test_the_report_says_how_far_a_volumes_neighbouring_slices_lie_from_its_test_slice():
    """A slab whose flat patch sits at 40 HU in the test slice and 46 HU in the slices within reach either side
    (70 beyond): pooling them reads +6 HU of bias against the test slice, and the report's Images line says so;
    a 2D image has no neighbours to measure."""
    hu = np.full((9, 64, 64), 70.0)
    hu[1:8] = 46.0
    hu[4] = 40.0
    slab = (hu + 1000.0) / 3000.0
    body = np.ones((1, 64, 64), bool)
    case = Case("flat", "CT", "HU", -1000.0, 3000.0, slab[4][None], slab[None], body=body, source="")
    _, flat = masks(case.clean[0], body[0])
    assert neighbour_offset(case, 0, flat) == pytest.approx(6.0)
    image = described(case)
    assert image["neighbour_offsets"] == [pytest.approx(6.0)]
    line = report.own_noise_over_flat_patch({**image, "own_noise_std": 0.01})
    assert "averages +6.00 HU from the test slice's" in line
    assert described(Case("flat", "CT", "HU", -1000.0, 3000.0, slab[4][None], None, body=body))[
        "neighbour_offsets"] is None


def test_flat_tissue_bias_is_the_mean_over_antithetic_pairs_of_draws():
    """A draw whose flat patch reads 12 HU above the clean tissue, and its twin 12 below: a method that keeps the
    noise, one that keeps half of it and adds 3 HU, and one that removes it and adds 3 HU read 0, 3 and 3 over the
    pair, where the first draw alone reads 12, 9 and 3."""
    clean = np.full((64, 64), (40.0 + 1000.0) / 3000.0)
    case = Case("flat", "CT", "HU", -1000.0, 3000.0, clean[None], None, body=np.ones((1, 64, 64), bool))
    _, flat = masks(clean, np.ones_like(clean, dtype=bool))
    noisy = clean + 12.0 / case.scale + np.random.default_rng(0).normal(0.0, 0.001, clean.shape)
    twin = NOISES[0].antithetic(clean, noisy)
    np.testing.assert_allclose(noisy + twin, 2 * clean)
    methods = {"keeps": lambda y: y, "half": lambda y: (y + clean) / 2 + 3.0 / case.scale,
               "removes": lambda y: clean + 3.0 / case.scale}
    draws = [{m: f(y) for m, f in methods.items()} for y in (noisy, twin)]
    first = flat_bias_over_pairs(case, clean, flat, [draws[0], draws[0]])  # the first draw alone
    assert {m: v[0] for m, v in first.items()} == pytest.approx({"keeps": 12.0, "half": 9.0, "removes": 3.0},
                                                                abs=0.2)
    pair = flat_bias_over_pairs(case, clean, flat, draws)
    assert {m: v[0] for m, v in pair.items()} == pytest.approx({"keeps": 0.0, "half": 3.0, "removes": 3.0}, abs=1e-9)
    del draws[1]["half"]  # a method missing from a draw (a peer that did not run) is left out
    assert set(flat_bias_over_pairs(case, clean, flat, draws)) == {"keeps", "removes"}


def test_antithetic_draws_pair_the_main_draw_with_its_twin_then_fresh_pairs():
    clean = toy_image(32)
    slab = np.stack([clean] * 5)
    rng = np.random.default_rng(1)
    for noise in (n for n in NOISES if n.kind != "rician"):
        for slabs in (None, slab[None]):
            case = Case("toy", "CT", "HU", -1000.0, 2000.0, clean[None], slabs)
            main_slab = None if slabs is None else noise.apply(slab, rng)
            main = noise.apply(clean, rng) if slabs is None else main_slab[2]
            draws = antithetic_draws(case, noise, 0, main, main_slab, rng, pairs=3)
            assert len(draws) == 5  # the main draw's twin, then two pairs
            images = [main_slab if slabs is not None else main] + [d[1] if slabs is not None else d[0] for d in draws]
            for a, b in zip(images[::2], images[1::2]):
                np.testing.assert_allclose(a + b, 2 * (clean if slabs is None else slab), atol=1e-12)
            assert not np.allclose(images[0], images[2])
            if slabs is not None:
                assert all(np.array_equal(centre, full[2]) for centre, full in draws)
            twin_noise = images[1] - (clean if slabs is None else slab)
            assert np.std(twin_noise) == pytest.approx(np.std(images[0] - images[1]) / 2, rel=1e-9)
    with pytest.raises(ValueError, match="Rician"):
        NOISES[-1].antithetic(clean, clean)


def toy_model(context=0):
    config = NetworkConfig(bsn_width=8, bsn_depth=1, unet_base=8, unet_mults=(1,), student_width=8,
                           context_slices=context)
    return DenoisingModel.build(config, SamplingConfig(steps=2, t_start=50),
                                {"name": "toy", "transform": {"name": "none"}}).eval()


def test_oracle_is_the_student_trained_on_clean_targets_and_runs_as_fast_mode():
    """From an untrained student (which hands back its input) the oracle learns to denoise; the model is untouched."""
    rng = np.random.default_rng(3)
    clean = toy_image(64)
    case = Case("toy", "CT", "HU", offset=-1000.0, scale=2000.0, clean=clean[None], slabs=None,
                train=[toy_image(96)[::-1], toy_image(80).T])
    model = toy_model()
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    oracle = train_oracle(model, case, NOISES[1], steps=60, batch=4, patch=32, lr=3e-3)
    noisy = NOISES[1].apply(clean, rng)
    out, _, _ = ours.run_mode("fast", oracle, case, noisy, None)
    assert psnr(clean, out, data_range=1.0) > psnr(clean, noisy, data_range=1.0) + 3.0
    assert all(np.array_equal(v, model.student.state_dict()[k]) for k, v in before.items())
    assert oracle.bsn is model.bsn and oracle.student is not model.student


def test_a_2_5d_oracle_trains_on_slabs_and_refuses_single_slices():
    clean = toy_image(48)
    slab = np.stack([clean] * 5)
    case = Case("toy", "CT", "HU", offset=-1000.0, scale=2000.0, clean=clean[None], slabs=slab[None],
                train=[clean], train_slabs=[slab])
    oracle = train_oracle(toy_model(context=2), case, NOISES[1], steps=2, batch=2, patch=32)
    out, _, _ = ours.run_mode("fast", oracle, case, clean, NOISES[1].apply(slab, np.random.default_rng(4)))
    assert out.shape == clean.shape and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="training slabs of 5 slices"):
        train_oracle(toy_model(context=2), Case("toy", "CT", "HU", -1000.0, 2000.0, clean[None], None,
                                                 train=[clean]), NOISES[1], steps=1)


def rows_for(image, noise, values, unit="HU"):
    """Rows of one slice; a CT's flat-tissue bias b comes as two antithetic pairs, b -+ 0.1."""
    return [{"image": image, "noise": noise, "method": m, "unit": unit, "psnr": p, "ssim": 0.9, "psnr_fg": p,
             "ssim_fg": 0.9, "edge_correlation": e, "seconds": 1.0, "peak_mib": 10.0, "slice": 0,
             "modality": "CT", "model": None, **({"flat_bias_pairs": [b - 0.1, b + 0.1]} if unit == "HU" else {})}
            for m, (p, e, b) in values.items()]


def test_report_tables_and_goals_follow_the_numbers():
    rows = rows_for("ct", "gaussian 6/255", {"noisy": (30, 0.0, 0.0), "bm3d": (35, 0.05, 0.2), "single": (34, 0.1, 2),
                                             "full": (36, 0.02, 0.5), "fast": (35.8, 0.03, 0.4),
                                             "oracle": (36.1, 0.01, 0.1), "single-unfused": (31, 0.1, 2),
                                             "full-unfused": (33, 0.1, 2)})
    rows += rows_for("ct", "poisson 200", {"noisy": (25, 0.0, 0.0), "bm3d": (31, 0.05, 0.2), "single": (29, 0.1, 2),
                                           "full": (30, 0.2, 3.0), "fast": (29, 0.2, 3.0), "oracle": (32, 0.0, 0.1),
                                           "single-unfused": (28, 0.1, 2), "full-unfused": (30, 0.1, 2)})
    table = report.aggregate(rows)
    assert table[("ct", "gaussian 6/255")]["full"]["psnr"] == 36
    assert table[("ct", "poisson 200")]["full"]["flat_bias"] == pytest.approx(3.0)
    assert table[("ct", "poisson 200")]["full"]["flat_bias_se"] == pytest.approx(0.1)
    assert report.cost_table(table, ["full"])[2] == "| full | 1.00 | 10 | 0.110 | 1.75 |"
    bias = report.bias_table(table, 2)
    assert "over 2 antithetic pairs" in bias[2]
    assert bias[7] == ("| ct | poisson 200 | +0.00 +- 0.10 | +0.20 +- 0.10 | +2.00 +- 0.10 | +3.00 +- 0.10 | "
                       "+3.00 +- 0.10 | +0.10 +- 0.10 | +2.00 +- 0.10 | +2.00 +- 0.10 |")
    lines = report.quality_table(table, report.methods_of(table), "psnr", "ssim")
    assert len(lines) == 4 and "**36.00 / 0.900**" in lines[2]
    goals = "\n".join(report.goals(table))
    assert "best peer + 0.5 dB PSNR**: missed: holds on 1 of 2" in goals
    assert "within 0.3 dB of Full**: missed: holds on 1 of 2" in goals
    # SRDS's pair over one sample: both samplers gain 2 dB; after fusion and the filters one image gains only 1
    assert "one sample + 1.5 dB, the samplers**: met: holds on 2 of 2" in goals
    assert "one sample + 1.5 dB, the images**: missed: holds on 1 of 2" in goals
    assert "below 1 HU**: missed: holds on 1 of 2" in goals
    assert "worst -1.50 at ct / poisson 200 (vs bm3d)" in goals
    assert "oracle falls below" not in goals
    rows += rows_for("mr", "gaussian 6/255", {"noisy": (30, 0.0, 0.0), "full": (33, 0.0, 0.0), "fast": (33, 0.0, 0.0),
                                              "oracle": (31, 0.0, 0.0)}, unit="a.u.")
    assert "oracle falls below Fast on 1 of 3 conditions" in "\n".join(report.goals(report.aggregate(rows)))
    assert "volumetric filter made" not in goals and "Counted only" not in goals
    made_by = {("mr", "gaussian 6/255"): "volumetric filter", ("ct", "poisson 200"): "correlated-noise filters"}
    for row in rows:
        if row["method"] in ("full", "fast", "oracle"):
            row["filters_made_the_image"] = made_by.get((row["image"], row["noise"]))
    goals = "\n".join(report.goals(report.aggregate(rows)))
    assert "On 1 condition (mr / gaussian 6/255) the volumetric filter made" in goals
    assert "On 1 condition (ct / poisson 200) the correlated-noise filters made" in goals
    # left: ct / gaussian 6/255 alone, where Fast is within 0.3 dB of Full and 0.5 of the oracle, and SRDS's
    # image is 2 dB above one sample's
    assert ("Counted only where the networks' result made or guided the image: Fast within 0.3 dB of Full on 1 of "
            "1; Fast within 0.5 dB of the oracle on 1 of 1; SRDS's image >= one sample's + 1.5 dB on 1 of 1.") in goals


def test_measured_reports_time_and_the_memory_a_call_holds():
    result, seconds, mib = measured(lambda: np.ones(8_000_000))
    assert result.size == 8_000_000 and seconds >= 0
    if mib is not None:
        assert mib > 40


def test_noise2void_patches_come_from_every_image_large_enough_in_proportion_to_area():
    from benchmarks.careamics_n2v import training_patches

    big, small, tiny = np.zeros((128, 128)), np.ones((64, 64)), np.full((32, 32), 2.0)
    patches = training_patches([big, small, tiny], 400, np.random.default_rng(0), patch=64)
    assert patches.shape == (400, 64, 64) and patches.dtype == np.float32
    share_small = np.mean(patches[:, 0, 0] == 1.0)
    assert 0.1 < share_small < 0.3  # 64^2 / (128^2 + 64^2) = 0.2
    assert not np.any(patches == 2.0)
    with pytest.raises(ValueError, match="at least 64x64"):
        training_patches([tiny], 4, np.random.default_rng(0), patch=64)


def test_noise2void_peer_hands_the_slice_and_noisy_regions_to_its_worker(tmp_path):
    import sys

    from benchmarks.peers import noise2void, noise2void_unavailable

    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys, numpy as np\n"
        "data = np.load(sys.argv[1])\n"
        "assert sys.argv[4] == '7' and sorted(data.files) == ['test', 'train_0', 'train_1']\n"
        "np.save(sys.argv[2], data['test'] * 0.5 + data['train_1'].mean())\n")
    noisy = np.full((16, 16), 0.4)
    cond = Condition(NOISES[0], 0.1, None, [(None, np.zeros((8, 8))), (None, np.full((8, 8), 0.1))])
    out = noise2void(sys.executable, 7, worker=worker).run(noisy, cond)
    np.testing.assert_allclose(out, 0.3)

    worker.write_text("import sys\nsys.exit('careamics exploded')\n")
    with pytest.raises(RuntimeError, match="careamics exploded"):
        noise2void(sys.executable, 7, worker=worker).run(noisy, cond)
    assert "--n2v-python" in noise2void_unavailable(None)
    if importlib.util.find_spec("careamics") is None:
        assert "careamics does not import" in noise2void_unavailable(sys.executable)


def test_a_figure_says_when_filters_alone_made_full_and_fast():
    clean = toy_image(32)
    noisy = clean + 0.1
    outputs = {"bm3d": (clean + 0.05, None), "full": (clean + 0.01, np.ones_like(clean)), "fast": (clean + 0.02, None)}
    titles = [t for t, _ in report.figure_panels("ct", "gaussian 6/255", clean, noisy, outputs, ["bm3d"])["panels"]]
    assert titles == ["clean", "noisy", "best peer: bm3d", "SRDS (full)", "student (fast)",
                      "method noise (noisy - SRDS)", "uncertainty (SRDS)"]
    outputs["full"] = (clean + 0.01, None)
    titles = [t for t, _ in report.figure_panels("ct", "gaussian 6/255", clean, noisy, outputs, ["bm3d"],
                                                 made_by="volumetric filter")["panels"]]
    assert titles == ["clean", "noisy", "best peer: bm3d", "volumetric filter (full)", "volumetric filter (fast)",
                      "method noise (noisy - full)"]  # Full's deeper Wiener groups
    outputs["fast"] = outputs["full"]
    titles = [t for t, _ in report.figure_panels("ct", "gaussian 6/255", clean, noisy, outputs, ["bm3d"],
                                                 made_by="volumetric filter")["panels"]]
    assert titles == ["clean", "noisy", "best peer: bm3d", "volumetric filter (full, fast)",
                      "method noise (noisy - full)"]


def test_the_report_gives_each_references_own_noise():
    """A real scan used as the clean reference carries noise of its own: the blind curve reads it (and nearly
    nothing on a smooth image), and the report's image list says how strong it is against Gaussian 6/255."""
    y, x = np.mgrid[0:64, 0:64] / 64.0
    smooth = np.stack([0.2 + 0.5 * x + 0.2 * np.exp(-((x - 0.5) ** 2 + (y - 0.4) ** 2) / 0.1)] * 2)
    noisy_reference = smooth + np.random.default_rng(6).normal(0, 0.012, smooth.shape)
    assert reference_noise_std(smooth) < 0.002
    assert abs(reference_noise_std(noisy_reference) - 0.012) < 0.002
    results = {"date": "d", "mode": "quick", "wall_seconds": 60.0, "settings": {"oracle_steps": 1}, "models": {},
               "machine": {"cpu": "cpu", "cores": 2, "torch_threads": 2, "python": "3", "torch": "2"},
               "not_run": {}, "missing_images": [],
               "rows": rows_for("mr", "gaussian 6/255", {"noisy": (30, 0.0, 0.0), "full": (33, 0.0, 0.0)}, "a.u."),
               "images": [{"name": "mr", "modality": "MR", "unit": "a.u.", "source": "s", "test_shape": [1, 64, 64],
                           "slab_depth": None, "own_noise_std": 0.012}]}
    text = report.markdown(results)
    assert "the reference's own noise (blind noise curve): std 0.0120 on the 0-1 scale (0.26 times" in text
    # a CT's flat patch: 10 HU of own noise per voxel averages to 0.5 HU over 400 voxels (if white)
    ct = {"unit": "HU", "unit_range": [-1000.0, 1500.0], "own_noise_std": 0.004, "flat_pixels": [400]}
    assert "(10.0 HU per voxel) averages to about 0.50 HU" in report.own_noise_over_flat_patch(ct)
    assert report.own_noise_over_flat_patch({**ct, "flat_pixels": [0]}) == ""
    assert report.own_noise_over_flat_patch({**ct, "unit": "a.u."}) == ""


def test_stage_costs_measure_every_stage_the_slicer_estimate_counts(tmp_path):
    """benchmarks/stage_costs.py on small slices writes a positive cost for every stage, and its stages are
    exactly the ones DenoiseLogic.estimate counts (a renamed stage would leave the estimate without a cost)."""
    from benchmarks import stage_costs
    from DiffDenoiseLib.slicer_logic import _CPU_SECONDS_PER_MEGAPIXEL

    assert stage_costs.main(["--sides", "32", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "stage_costs.json").read_text())
    assert set(results["stages"]) == set(_CPU_SECONDS_PER_MEGAPIXEL)
    for name, stage in results["stages"].items():
        assert stage["seconds_per_megapixel"]["32"] > 0 and stage["seconds_per_slice"]["32"] > 0, name
    table = (tmp_path / "stage_costs.md").read_text()
    assert all(f"| `{name}` |" in table for name in results["stages"])

    # one stage measured again: the others keep their figures, and the sides must be the earlier run's
    for stage in results["stages"].values():
        stage["date"] = "2000-01-01"
    (tmp_path / "stage_costs.json").write_text(json.dumps(results))
    assert stage_costs.main(["--sides", "32", "--out", str(tmp_path), "--stages", "volumetric_filter"]) == 0
    again = json.loads((tmp_path / "stage_costs.json").read_text())
    assert set(again["stages"]) == set(results["stages"])
    assert [name for name, stage in again["stages"].items() if stage["date"] != "2000-01-01"] == ["volumetric_filter"]
    assert again["stages"]["student"] == results["stages"]["student"]
    with pytest.raises(SystemExit):
        stage_costs.main(["--sides", "48", "--out", str(tmp_path), "--stages", "student"])


@pytest.mark.parametrize("earlier", [None, "{not json", "[]"])
def test_stage_costs_stages_without_an_earlier_run_say_so(tmp_path, capsys, earlier):
    """`--stages` keeps the other stages' figures from an earlier stage_costs.json: a folder without one, or with
    one that is not a result, is a usage error naming the file, and nothing is measured or written."""
    from benchmarks import stage_costs

    if earlier is not None:
        (tmp_path / "stage_costs.json").write_text(earlier)
    with pytest.raises(SystemExit) as exit_info:
        stage_costs.main(["--sides", "32", "--out", str(tmp_path), "--stages", "student"])
    assert exit_info.value.code == 2
    assert "stage_costs.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if earlier is None else ["stage_costs.json"])


def test_stage_costs_time_the_noise_shape_read_apart_from_the_filter_after_it():
    """The filters' reads of the noise's shape do not grow with a long scan (wiener.shape_read_steps and
    noise_shape_steps): stage_costs times each per step of the read, and the volumetric filter after it in slices;
    the parts lie within the call."""
    from benchmarks import stage_costs
    from DiffDenoiseLib.noise import add_noise
    from DiffDenoiseLib.wiener import noise_shape_steps, shape_read_steps

    clean = stage_costs.phantom(8, 32)
    noisy = {"mild": add_noise(clean, "correlated", 0.5, np.random.default_rng(3)).astype(np.float32)}
    (reads, read_s), whole_read, _ = measured(lambda: stage_costs.volumetric("mild", part="shape_read")(noisy, {}))
    assert reads == shape_read_steps(8, range(8)) > 0 and 0 < read_s < whole_read
    (slices, filter_s), whole, _ = measured(lambda: stage_costs.volumetric("mild")(noisy, {}))
    assert 4 < slices < 8 and 0 < filter_s < whole  # an 8-slice stack has fewer passes per slice than a long scan
    white = {"white": add_noise(clean[:4], "gaussian", 0.1, np.random.default_rng(4)).astype(np.float32)}
    (reads, read_s), whole_2d, _ = measured(lambda: stage_costs.noise_shape_read_2d(white, {}))
    assert reads == noise_shape_steps(range(4)) == 16 and 0 < read_s < whole_2d  # a 2D model's read, 4 per slice
    assert stage_costs.timed(stage_costs.Stage("t", "t", 8, lambda *_: (3.0, 1.5)), noisy, {}) == (3.0, 1.5)


def test_the_gpu_check_compares_two_devices_and_refuses_to_run_without_cuda(monkeypatch, capsys, tmp_path):
    """benchmarks/gpu_check.py: its comparison, run here with the CPU in both places, finds the same image
    twice; without CUDA it writes nothing and says why; its report has a row for every comparison recorded."""
    from benchmarks import gpu_check
    clean = toy_image(64).astype(np.float32) * 1000
    noisy = clean + np.random.default_rng(3).normal(0, 40, clean.shape).astype(np.float32)
    cpu = torch.device("cpu")
    rows = gpu_check.agreement("ct-head-default", Image(array=noisy, spacing=(1.0, 1.0), modality="CT"), {},
                               clean, 1000.0, devices=(cpu, cpu))
    assert [r["mode"] for r in rows] == ["fast", "full"]
    for r in rows:
        assert r["cuda_seconds"] > 0 and r["cpu_seconds"] > 0 and r["cuda_peak_mib"] is None
        assert r["cuda_psnr"] == r["cpu_psnr"] > psnr(clean, noisy, 1000.0) + 3
        assert r["max_abs_diff_hu"] == 0.0
    (named,) = gpu_check.agreement("ct-head-default", Image(array=noisy, spacing=(1.0, 1.0), modality="CT"), {},
                                   clean, 1000.0, devices=(cpu, cpu), modes=("fast",), noise="white 40")
    assert named["model"] == "ct-head-default (white 40)" and named["cuda_psnr"] == rows[0]["cuda_psnr"]

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err and not list(tmp_path.iterdir())

    recorded = json.loads((Path(gpu_check.ROOT) / "benchmarks" / "results" / "gpu_check.json").read_text())
    table = gpu_check.report(recorded)
    for r in recorded["agreement"]:
        assert f"| {r['model']} | {r['mode']} | {'x'.join(map(str, r['shape']))} | {r['cuda_seconds']} |" in table
    assert table.count(" s per slice") == len(recorded["volume_256x256"])
