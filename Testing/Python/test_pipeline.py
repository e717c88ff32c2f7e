"""Denoising an image end to end: units, geometry, graceful degradation, quality on a real CT slice."""

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffDenoiseLib import noise_weight, pipeline, wiener
from DiffDenoiseLib.fusion import ANATOMY_EDGE_CORRELATION
from DiffDenoiseLib.imageio import Image, read_image, write_image
from DiffDenoiseLib.magnitude import rician_mean
from DiffDenoiseLib.metrics import psnr
from DiffDenoiseLib.noise import (
    FAINT_NOISE_SHAPE_MAX_BINNING_RATIO, NOISE_SHAPE_MIN_BINNING_RATIO, WHITE_NOISE_MAX_BINNING_RATIO, add_noise,
    binning_noise_reading, reading_is_faint_and_mildly_correlated, reading_is_strong,
)
from DiffDenoiseLib.normalization import Normalization
from DiffDenoiseLib.networks import NetworkConfig
from DiffDenoiseLib.pipeline import (
    DenoisingModel, SamplingConfig, denoise_image, filters_read_the_noise_shape,
)
from DiffDenoiseLib.training import TrainConfig, train_model
from DiffDenoiseLib.wiener import CUBE, volumetric_filter_steps

SMALL = NetworkConfig(bsn_width=16, bsn_depth=3, unet_base=16, unet_mults=(1, 2), student_width=16)


@pytest.fixture(scope="module")
def ct_slice():
    """pydicom's bundled 128x128 CT slice (HU) with synthetic Gaussian noise of 60 HU."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    clean = read_image(get_testdata_file("CT_small.dcm"))
    hu = clean.array.astype(np.float64).reshape(clean.array.shape[-2:])
    noisy = hu + np.random.default_rng(0).normal(0, 60, hu.shape)
    geometry = dict(spacing=clean.spacing[:2], origin=clean.origin[:2], direction=(1.0, 0.0, 0.0, 1.0))
    return hu, Image(array=noisy.astype(np.float32), modality="CT", **geometry)


@pytest.fixture(scope="module")
def trained(ct_slice, tmp_path_factory):
    """Small models trained on the noisy slice alone (self-supervised): a real but short run."""
    _, noisy = ct_slice
    config = TrainConfig(bsn_steps=400, diffusion_steps=300, student_steps=300, batch_size=8, bsn_patch=48,
                         diffusion_patch=48, student_patch=48, student_slices=1, bsn_lr=2e-3)
    return train_model([noisy], tmp_path_factory.mktemp("ct"), "ct-small", network_config=SMALL,
                       train_config=config, sampling=SamplingConfig(steps=4, t_start=100))


def test_every_mode_beats_the_noisy_input_on_a_real_ct_slice(ct_slice, trained):
    clean, noisy = ct_slice
    data_range = float(clean.max() - clean.min())
    before = noisy.array.copy()
    scores = {"noisy": psnr(clean, noisy.array, data_range=data_range)}
    for mode in ("bsn", "full", "fast"):
        result = denoise_image(noisy, trained, mode=mode)
        assert result.image.array.dtype == np.float32 and result.image.array.shape == clean.shape
        scores[mode] = psnr(clean, result.image.array, data_range=data_range)
    assert np.array_equal(noisy.array, before), "the input image must never be modified"
    for mode in ("bsn", "full", "fast"):
        assert scores[mode] > scores["noisy"] + 1.5, scores
    # the output is in the input's units: mean HU is kept
    assert abs(float(denoise_image(noisy, trained, mode="fast").image.array.mean()) - clean.mean()) < 15


def test_ct_padding_keeps_its_value_and_the_networks_never_see_it(ct_slice, trained, volume_and_model):
    """Padding outside the field of view (-3024 HU in the corners) comes back as it was, with no uncertainty, and
    every other voxel is what the same image gives with the padding already raised to its lowest real value; in a
    slice range too. The input is not modified."""
    _, noisy = ct_slice
    yy, xx = np.mgrid[:128, :128] - 63.5
    outside = np.hypot(yy, xx) > 62
    padded, raised = noisy.array.copy(), noisy.array.copy()
    padded[outside], raised[outside] = -3024.0, noisy.array[~outside].min()
    before = padded.copy()
    for mode in ("fast", "full"):
        result = denoise_image(replace(noisy, array=padded), trained, mode=mode)
        assert np.all(result.image.array[outside] == -3024.0), mode
        assert result.details["padding"] == {"value": -3024.0, "voxels": int(outside.sum())}
        same = denoise_image(replace(noisy, array=raised), trained, mode=mode)
        assert "padding" not in same.details
        np.testing.assert_allclose(result.image.array[~outside], same.image.array[~outside], atol=1e-3)
    assert np.all(result.uncertainty.array[outside] == 0) and result.uncertainty.array[~outside].max() > 0
    assert np.array_equal(padded, before), "the input image must never be modified"
    image, model = volume_and_model
    volume = image.array.copy()
    volume[:, :4, :4] = -3024.0
    part = denoise_image(replace(image, array=volume), model, mode="fast", slice_range=(3, 5)).image.array
    assert part.shape == (2, 40, 36) and np.all(part[:, :4, :4] == -3024.0) and part[:, 4:, 4:].min() > -1000


def test_padding_does_not_move_the_shipped_ct_models_tissue():
    """A head phantom under CT-like noise (correlated over about a pixel, 15 HU) with -3024 HU outside its
    reconstructed circle: stretched by the padding, the shipped CT model's Full result put the brain 40 HU low and
    Fast's 4 HU high; with the padding kept out of the range both stay within 2 HU of the input."""
    from DiffDenoiseLib.store import SHIPPED_DIR, load_model

    n = 192
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(yy / 0.85, xx / 0.7)
    hu = np.select([r < 0.38 * n, r < 0.42 * n], [35.0, 1200.0], -1000.0)
    hu = hu + add_noise(np.zeros((n, n)), "correlated", 1.0, np.random.default_rng(0), sigma=15.0)
    hu[np.hypot(yy, xx) > 0.48 * n] = -3024.0
    brain = r < 0.3 * n
    image = Image(array=hu.astype(np.float32), modality="CT")
    model = load_model(SHIPPED_DIR / "ct-head-default")
    for mode in ("fast", "full"):
        out = denoise_image(image, model, mode=mode).image.array
        assert abs(float(out[brain].mean() - image.array[brain].mean())) < 3.0, mode


def test_the_self_ensemble_is_the_models_unless_asked_and_is_checked(ct_slice, trained):
    _, noisy = ct_slice
    assert trained.sampling.self_ensemble == 4
    default = denoise_image(noisy, trained, mode="bsn")
    assert default.details["self_ensemble"] == 4
    one = denoise_image(noisy, trained, mode="bsn", self_ensemble=1)
    assert one.details["self_ensemble"] == 1
    assert np.abs(one.image.array - default.image.array).max() > 0.1  # HU
    assert "self_ensemble" not in denoise_image(noisy, trained, mode="fast").details
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        SamplingConfig(self_ensemble=3)
    with pytest.raises(ValueError, match="1, 2, 4 or 8"):
        denoise_image(noisy, trained, mode="bsn", self_ensemble=6)


def test_full_mode_with_a_barely_trained_diffusion_model_is_not_worse_than_the_bsn(ct_slice, trained, tmp_path):
    clean, noisy = ct_slice
    bsn_only = DenoisingModel.from_card(trained.card, {"bsn": trained.bsn.state_dict()})
    barely = train_model([noisy], tmp_path, "barely", init_from=bsn_only,
                         train_config=TrainConfig(stages=("diffusion",), diffusion_steps=2, batch_size=2,
                                                  diffusion_patch=32))
    data_range = float(clean.max() - clean.min())
    bsn = psnr(clean, denoise_image(noisy, barely, mode="bsn").image.array, data_range=data_range)
    full = psnr(clean, denoise_image(noisy, barely, mode="full").image.array, data_range=data_range)
    assert full >= bsn - 0.05, (full, bsn)


def test_observation_fusion_gives_back_detail_the_blind_estimates_lose(ct_slice, trained):
    clean, noisy = ct_slice
    data_range = float(clean.max() - clean.min())
    for mode in ("bsn", "full"):
        fused = denoise_image(noisy, trained, mode=mode)
        blind = denoise_image(noisy, trained, mode=mode, fusion=False)
        assert fused.details["fusion"] and not blind.details["fusion"]
        gain = psnr(clean, fused.image.array, data_range=data_range) - psnr(clean, blind.image.array,
                                                                             data_range=data_range)
        assert gain > 0.3, (mode, gain)
    assert fused.details["correlated_noise"] is False


def test_a_fused_2d_result_goes_through_the_wiener_filter_and_a_2_5d_models_volume_through_the_volumetric_one(
        ct_slice, trained, volume_and_model):
    _, noisy = ct_slice
    for mode in ("full", "fast", "bsn"):
        details = denoise_image(noisy, trained, mode=mode).details
        assert details["wiener"] is True and details["hard_threshold"] is True, mode
        assert "filters_made_the_image" not in details
        assert "wiener" not in denoise_image(noisy, trained, mode=mode, fusion=False).details
    image, model = volume_and_model
    for mode in ("full", "fast", "bsn"):
        result = denoise_image(image, model, mode=mode)
        assert result.details["filters_made_the_image"] == "volumetric filter" and result.uncertainty is None, mode
        assert "filters_made_the_image" not in denoise_image(image, model, mode=mode, fusion=False).details


def test_the_volumetric_filter_makes_a_2_5d_models_image_only_of_a_volume_with_white_noise(volume_and_model):
    """Its image owes nothing to the networks (every mode but Fast gives the same; Fast's Wiener groups are
    shallower, `deep_wiener_groups`), its progress ends full, a slice range gives nearly the whole result's
    slices (the groups near the range's ends differ), and a volume of fewer than CUBE slices or too small slices send
    the image to the networks."""
    image, model = volume_and_model
    reports = []
    fast = denoise_image(image, model, mode="fast", progress=reports.append)
    assert reports[-1].step == reports[-1].total == volumetric_filter_steps(9, range(9))
    assert fast.details["correlated_noise"] is False and fast.details["noise_shape_read"] is False
    full = denoise_image(image, model, mode="full").image.array
    for mode in ("single", "bsn"):  # the benchmark runs this computation once for these modes (ours.measured_modes)
        np.testing.assert_array_equal(full, denoise_image(image, model, mode=mode).image.array)
    assert 0 < np.abs(full - fast.image.array).mean() < 0.1 * np.abs(fast.image.array - image.array).mean()
    part = denoise_image(image, model, mode="fast", slice_range=(4, 5)).image.array
    assert np.abs(part - fast.image.array[4:5]).mean() < 0.02 * np.abs(fast.image.array[4:5] - image.array[4:5]).mean()
    for array in (image.array[:CUBE - 1], image.array[:, :12, :12]):
        details = denoise_image(Image(array=array, modality="MR"), model, mode="fast", slice_axis=0).details
        assert details.get("filters_made_the_image") != "volumetric filter", array.shape


def test_strong_correlated_noise_sends_a_one_pixel_2_5d_models_volume_to_the_volumetric_filter_with_its_covariance(
        volume_and_model):
    """A one-pixel blind spot passes correlated noise, so its volume goes to the volumetric filter told the noise's
    covariance (the image, in every mode, owes nothing to the networks); a wide blind spot's result, which removed
    the noise, keeps making the image; and faint noise that does not look white (fine texture under noise of 2 units
    in 1500) keeps the networks' result."""
    _, model = volume_and_model
    rng = np.random.default_rng(5)
    correlated = Image(array=add_noise(np.full((9, 40, 36), 100.0), "correlated", 0.5, rng, sigma=20.0).astype(
        np.float32), modality="MR")
    reports = []
    fast = denoise_image(correlated, model, mode="fast", slice_axis=0, progress=reports.append)
    assert fast.details["filters_made_the_image"] == "volumetric filter" and fast.details["correlated_noise"] is True
    assert fast.details["noise_shape_read"] is True and fast.details["faint_noise"] is False
    assert reports[-1].step == reports[-1].total == volumetric_filter_steps(9, range(9), correlated_noise=True)
    np.testing.assert_array_equal(fast.image.array, denoise_image(correlated, model, mode="full",
                                                                  slice_axis=0).image.array)
    assert np.std(fast.image.array) < 0.2 * np.std(correlated.array)
    config = NetworkConfig(context_slices=1, blind_spot_radius=2, bsn_width=8, bsn_depth=2, unet_base=8,
                           unet_mults=(1,), student_width=8)
    wide = DenoisingModel.build(config, SamplingConfig(steps=2, t_start=60), {"name": "wide",
                                                                              "transform": {"name": "none"}}).eval()
    details = denoise_image(correlated, wide, mode="fast", slice_axis=0).details
    assert details["correlated_noise"] is True and "filters_made_the_image" not in details
    yy, xx = np.mgrid[0:40, 0:36]
    texture = np.stack([1500.0 + 10.0 * xx + 800.0 * ((yy - 20) ** 2 / 120 + (xx - 18) ** 2 / 60 < 1)
                        + 60.0 * np.sin(xx / 1.5) * np.cos(yy / 2.0) + rng.normal(0, 2.0, (40, 36)) for _ in range(9)])
    faint = denoise_image(Image(array=texture.astype(np.float32), modality="MR"), model, mode="fast", slice_axis=0)
    assert "filters_made_the_image" not in faint.details


def test_faint_noise_that_reads_mildly_correlated_sends_a_one_pixel_2_5d_models_volume_to_the_filter(
        volume_and_model):
    """Faint noise of a 0.5-pixel kernel (std 5 in a range of 500: a sharp reconstruction kernel's) reads neither
    white nor strong: the volumetric filter reads its shape and makes the image, which it brings 4 dB or more closer
    to the clean volume; the same reading at a ratio past FAINT_NOISE_SHAPE_MAX_BINNING_RATIO (fine anatomy, wide
    kernels) does not count."""
    _, model = volume_and_model
    zz, yy, xx = np.mgrid[0:9, 0:48, 0:48]
    clean = 1000.0 + 400.0 * ((yy - 24) ** 2 + (xx - 22) ** 2 < 150 + 10 * zz) + 2.0 * xx
    noisy = clean + add_noise(np.zeros(clean.shape), "correlated", 0.5, np.random.default_rng(9), sigma=5.0)
    reading = binning_noise_reading(noisy)
    assert reading_is_faint_and_mildly_correlated(reading) and not reading_is_strong(reading)
    result = denoise_image(Image(array=noisy.astype(np.float32), modality="CT"), model, mode="fast", slice_axis=0)
    assert result.details["filters_made_the_image"] == "volumetric filter"
    assert result.details["correlated_noise"] is True and result.details["noise_shape_read"] is True
    assert result.details["faint_noise"] is True
    assert psnr(clean, result.image.array, 500.0) > psnr(clean, noisy, 500.0) + 4.0
    assert filters_read_the_noise_shape(reading)
    for ratio in (WHITE_NOISE_MAX_BINNING_RATIO, FAINT_NOISE_SHAPE_MAX_BINNING_RATIO + 0.1):
        assert not reading_is_faint_and_mildly_correlated((ratio, reading[1])), ratio
    assert not reading_is_faint_and_mildly_correlated((reading[0], 0.1)), "strong noise has rules of its own"


def test_strong_noise_that_reads_nearly_white_has_its_shape_read_by_the_volumetric_filter(volume_and_model):
    """Noise of a 0.45-pixel kernel reads white by the binning ratio (so Fast's share and fusion would take it), yet
    the filter of white noise leaves its low frequencies: strong, it has its shape read; faint noise, or noise whose
    ratio is a white one's, keeps the filter of white noise."""
    _, model = volume_and_model
    noise = add_noise(np.zeros((9, 48, 48)), "correlated", 0.45, np.random.default_rng(8), sigma=20.0)
    reading = binning_noise_reading(noise + 100.0)
    assert NOISE_SHAPE_MIN_BINNING_RATIO < reading[0] <= WHITE_NOISE_MAX_BINNING_RATIO
    details = denoise_image(Image(array=(noise + 100.0).astype(np.float32), modality="MR"), model, mode="fast",
                            slice_axis=0).details
    assert details["filters_made_the_image"] == "volumetric filter"
    assert details["correlated_noise"] is False and details["noise_shape_read"] is True
    assert filters_read_the_noise_shape(reading)
    assert not filters_read_the_noise_shape((reading[0], 0.01))
    assert not filters_read_the_noise_shape((1.1, reading[1]))


def test_a_2d_models_filters_read_the_shape_of_strong_noise_that_reads_nearly_white(ct_slice, trained):
    """The CT slice under noise of a 0.45-pixel kernel (it reads white by the binning ratio): the 2D filters after
    the networks read the noise's shape and beat the same run without it; under its white Gaussian noise they do
    not read it."""
    hu, white = ct_slice
    noisy = hu + add_noise(np.zeros(hu.shape), "correlated", 0.45, np.random.default_rng(12), sigma=150.0)
    image = Image(array=noisy.astype(np.float32), modality="CT")
    assert NOISE_SHAPE_MIN_BINNING_RATIO < binning_noise_reading(noisy)[0] <= WHITE_NOISE_MAX_BINNING_RATIO
    reports = []
    shaped = denoise_image(image, trained, mode="fast", progress=reports.append)
    assert shaped.details["noise_shape_read"] is True and shaped.details["hard_threshold"] is True
    assert reports[-1].step == reports[-1].total
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "filters_2d_read_the_noise_shape", lambda side, noise_shape: False)
        plain = denoise_image(image, trained, mode="fast")
    peak = hu.max() - hu.min()
    assert psnr(hu, shaped.image.array, peak) > psnr(hu, plain.image.array, peak) + 0.5
    assert denoise_image(white, trained, mode="fast").details["noise_shape_read"] is False


def test_a_2d_models_wiener_step_weighs_the_white_noise_as_chosen_on_the_image(ct_slice, trained, monkeypatch):
    """Under white noise each mode's Wiener step weighs the noise as noise_weight chooses it on the image (the
    student's chain in Full and Fast, the blind-spot network's in "bsn"), the progress bar counting its probes; the
    same image gets the same weight. A read noise shape chooses none."""
    _, noisy = ct_slice
    weighed, chains = [], []
    wiener_step, choose = pipeline.collaborative_wiener, noise_weight.choose_noise_scale
    monkeypatch.setattr(pipeline, "collaborative_wiener",
                        lambda *a, **k: weighed.append(k["noise_scale"]) or wiener_step(*a, **k))
    monkeypatch.setattr(noise_weight, "choose_noise_scale", lambda *a, **k: chains.append(k["deep_groups"]) or
                        choose(*a, **k))
    for mode in ("fast", "full", "bsn"):
        reports = []
        details = denoise_image(noisy, trained, mode=mode, progress=reports.append).details
        scale = details["wiener_noise_scale"]
        assert scale in noise_weight.NOISE_SCALES and weighed[-1] == scale
        assert reports[-1].step == reports[-1].total
    assert chains == [False, True, True]
    assert denoise_image(noisy, trained, mode="fast").details["wiener_noise_scale"] == weighed[0]
    monkeypatch.setattr(pipeline, "filters_2d_read_the_noise_shape", lambda side, noise_shape: True)
    assert "wiener_noise_scale" not in denoise_image(noisy, trained, mode="fast").details
    assert weighed[-1] == wiener.WIENER_2D_NOISE_SCALE


def test_a_2d_models_wiener_step_takes_shallower_groups_in_fast_mode(ct_slice, trained, monkeypatch):
    """Under white noise Fast's Wiener step keeps groups of wiener.SHALLOW_WIENER_GROUP_2D for a fifth of its time,
    the other modes take them as deep as their similar patches allow (`deep_wiener_groups`)."""
    _, white = ct_slice
    asked = []
    wiener_step = pipeline.collaborative_wiener
    monkeypatch.setattr(pipeline, "collaborative_wiener",
                        lambda *args, **kwargs: asked.append(kwargs["deep_groups"]) or wiener_step(*args, **kwargs))
    for mode in ("fast", "bsn"):
        assert denoise_image(white, trained, mode=mode).details["wiener"] is True, mode
    assert asked == [False, True]


def test_a_small_2d_image_has_its_noise_shape_read_where_one_covariance_window_fits(ct_slice, trained):
    """A 40-row strip of the CT slice under noise of a 0.45-pixel kernel: the filters read the noise's shape (one
    window of the covariance's read fits) and beat the filters of white noise, which take such noise for white; a
    24-row strip, where no window fits, keeps the filters of white noise."""
    hu, _ = ct_slice
    rng = np.random.default_rng(22)
    peak = hu.max() - hu.min()
    for rows, read in ((40, True), (24, False)):
        clean = hu[44:44 + rows]
        noisy = clean + add_noise(np.zeros(clean.shape), "correlated", 0.45, rng, sigma=150.0)
        reading = binning_noise_reading(noisy)
        assert NOISE_SHAPE_MIN_BINNING_RATIO < reading[0] <= WHITE_NOISE_MAX_BINNING_RATIO and reading_is_strong(reading)
        image = Image(array=noisy.astype(np.float32), modality="CT")
        result = denoise_image(image, trained, mode="fast")
        assert result.details["noise_shape_read"] is read and result.details["wiener"] is True, rows
        if read:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(pipeline, "filters_2d_read_the_noise_shape", lambda side, noise_shape: False)
                plain = denoise_image(image, trained, mode="fast")
            assert psnr(clean, result.image.array, peak) > psnr(clean, plain.image.array, peak) + 0.5


def test_under_correlated_noise_only_a_2_5d_result_is_filtered_and_gains_on_real_ct():
    """Five copies of pydicom's CT slice, each with its own noise blurred by 1.2 pixels: the shipped 2.5D
    correlated-noise model's Fast result goes through the filter (its groups reach the neighbouring slices, whose
    noise is independent, and are matched on the blind-spot estimate) and keeps the student's output alone, which
    learned the filtered image (30.46 dB against 30.50, from 20.19; with the student before its last distillation
    the filter gained 0.13 dB here; on the benchmark's held-out slabs it gains 0.03 and 0.72 on average); Fast is
    then as good as Full (30.46 both), whose groups are matched on SRDS's result and whose gains come from the
    student's. The 2.5D CT
    model (a one-pixel blind spot, which leaves correlated noise in its result) hands the volume to the volumetric
    filter with exact variances instead. On one slice the 2D model's result only
    picks the flat windows the noise covariance is read in: hard thresholding and the Wiener step guided by it,
    with exact variances, gain over the student's output too, Full gives no uncertainty map (the filters made the
    image); the progress ends full."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from DiffDenoiseLib.store import SHIPPED_DIR, load_model

    hu = read_image(get_testdata_file("CT_small.dcm")).array.reshape(128, 128).astype(np.float64)
    low, high = np.percentile(hu, [0.5, 99.5])
    clean = np.stack([hu] * 5)
    noise = add_noise(np.zeros_like(clean), "correlated", 1.2, np.random.default_rng(4), sigma=0.1) * (high - low)
    volume = Image(array=(clean + noise).astype(np.float32), modality="CT")
    model = load_model(SHIPPED_DIR / "correlated-noise-2.5d")
    filtered = denoise_image(volume, model, mode="fast", slice_axis=0)
    assert filtered.details["correlated_noise"] is True and filtered.details["wiener"] is True
    assert filtered.details["groups_matched_on"] == "blind-spot estimate"
    student = denoise_image(volume, model, mode="fast", slice_axis=0, fusion=False).image.array
    fast_psnr = psnr(clean[2], filtered.image.array[2], data_range=high - low)
    gain = fast_psnr - psnr(clean[2], student[2], data_range=high - low)
    assert fast_psnr > 30.0 and gain > -0.1, (fast_psnr, gain)
    gains = []
    with pytest.MonkeyPatch.context() as patch:  # Full's groups are matched on SRDS's result, its gains the student's
        filters = pipeline.correlated_noise_filters
        patch.setattr(pipeline, "correlated_noise_filters",
                      lambda *args, **options: gains.append(options["gains_from"]) or filters(*args, **options))
        full = denoise_image(volume, model, mode="full", slice_axis=0, slice_range=(2, 3))
    assert full.details["wiener_gains_from"] == "student"
    normalized = Normalization.fit(volume.array.astype(np.float64)).forward(student.astype(np.float64))
    np.testing.assert_allclose(gains[0], normalized, atol=1e-4)  # the networks ran on all 5: 2 slices either way
    assert fast_psnr > psnr(clean[2], full.image.array[0], data_range=high - low) - 0.1
    one_pixel_spot = denoise_image(volume, load_model(SHIPPED_DIR / "ct-head-2.5d"), mode="fast", slice_axis=0).details
    assert one_pixel_spot["correlated_noise"] is True
    assert one_pixel_spot["filters_made_the_image"] == "volumetric filter"
    one_slice = Image(array=volume.array[2], spacing=(1.0, 1.0), modality="CT")
    reports = []
    two_d = load_model(SHIPPED_DIR / "correlated-noise-default")
    averaged = denoise_image(one_slice, two_d, mode="fast", progress=reports.append)
    details = averaged.details
    assert details["correlated_noise"] is True and details["wiener"] is True and details["hard_threshold"] is True
    assert reports[-1].step == reports[-1].total
    alone = denoise_image(one_slice, two_d, mode="fast", fusion=False).image.array
    gain = psnr(hu, averaged.image.array, data_range=high - low) - psnr(hu, alone, data_range=high - low)
    assert gain > 0.3, gain
    full = denoise_image(one_slice, two_d, mode="full")  # the filters made the image: no uncertainty map of SRDS's
    assert full.details["filters_made_the_image"] == "correlated-noise filters" and full.uncertainty is None


def test_a_2_5d_result_has_the_noise_covariance_read_on_its_residual_and_a_2d_one_in_the_windows(monkeypatch):
    """A 2.5D model's result keeps little of correlated noise, so the covariance is read on y - result; a 2D
    model's result and the hard-thresholding estimate keep much of it, so both steps read it in the windows."""
    from DiffDenoiseLib.noise import noise_variance_curve

    reads, read = [], wiener.estimate_noise_covariance
    monkeypatch.setattr(wiener, "estimate_noise_covariance",
                        lambda *args, **options: reads.append(options["residual"]) or read(*args, **options))
    noisy = add_noise(np.full((5, 48, 48), 0.5), "correlated", 1.2, np.random.default_rng(1), sigma=0.05)
    result, white = np.full_like(noisy, 0.5), noise_variance_curve(noisy)
    pipeline.correlated_noise_filters(noisy, result, white, 2, [2])
    assert reads == [True]
    reads.clear()
    pipeline.correlated_noise_filters(noisy[2:3], result[2:3], white, 0, [0])
    assert reads == [False, False]


def test_a_slice_range_runs_the_networks_on_the_neighbours_the_2_5d_wiener_filter_groups(volume_and_model,
                                                                                         networks_make_the_image):
    """The toy model sees one slice each way, so its filter groups patches of one slice each way: the networks run
    on 4..7 for the slices 5..6, and the progress counts them and the filtered slices."""
    image, model = volume_and_model
    reports = []
    denoise_image(image, model, mode="bsn", slice_range=(5, 7), progress=reports.append)
    assert reports[-1].total == 4 + 2 and reports[-1].step == reports[-1].total
    reports.clear()
    denoise_image(image, model, mode="bsn", slice_range=(0, 1), progress=reports.append)  # no slice before 0
    assert reports[-1].total == 2 + 1
    reports.clear()
    denoise_image(image, model, mode="bsn", slice_range=(5, 7), fusion=False, progress=reports.append)
    assert reports[-1].total == 2


def test_a_wide_blind_spots_2_5d_model_runs_its_networks_on_every_slice_its_wiener_step_reads():
    """Its Wiener groups under correlated noise reach CORRELATED_FILTER_SLICE_REACH slices either way and go back to
    every slice their members lie in, so a slice range's networks run twice that far; a one-pixel blind spot's
    filters read its own context, a 2D model's none."""
    def config(context, radius):
        return NetworkConfig(context_slices=context, blind_spot_radius=radius)
    reach = pipeline.CORRELATED_FILTER_SLICE_REACH
    assert pipeline.networks_reach(config(2, 3)) == 2 * reach == 2 * pipeline.correlated_filter_reach(config(2, 3))
    assert pipeline.networks_reach(config(2, 0)) == 2 and pipeline.networks_reach(config(0, 3)) == 0


def test_a_slice_range_too_small_for_the_filters_runs_the_networks_on_those_slices_alone(
        volume_and_model, networks_make_the_image, monkeypatch):
    """Slices under MIN_SIDE_TO_JUDGE_NOISE a side get no filter, so the networks need no neighbours there."""
    image, model = volume_and_model
    ran_on = []
    real = pipeline.run_network_on_slices

    def counted(network, slices, indices=None, **run):
        ran_on.append(len(slices) if indices is None else len(indices))
        return real(network, slices, indices=indices, **run)

    monkeypatch.setattr(pipeline, "run_network_on_slices", counted)
    tiny = Image(array=np.ascontiguousarray(image.array[:, :12, :12]), spacing=image.spacing, modality="MR")
    result = denoise_image(tiny, model, mode="bsn", slice_range=(5, 7))
    assert ran_on == [2] and result.image.array.shape == (2, 12, 12) and not result.details["wiener"]
    ran_on.clear()
    denoise_image(image, model, mode="bsn", slice_range=(5, 7))
    assert ran_on == [4], "slices of 36 voxels and more get the filter, and the networks run on its neighbours"


class OversmoothingStudent(torch.nn.Module):
    """A student that blurs the centre slice (5x5 mean): too much for weak noise on fine texture."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, y):
        k = self.config.context_slices
        return torch.nn.functional.avg_pool2d(y[:, k:k + 1], 5, stride=1, padding=2, count_include_pad=False)


def test_fast_mode_gives_back_the_share_of_the_observation_stein_prefers():
    """Weak noise on fine texture: the blurring student's result gains by taking part of each voxel's own
    value back; the share comes out in details, and fusion=False keeps the student's output as it is."""
    y, x = np.mgrid[:96, :96]
    clean = 100.0 + 40.0 * np.sin(x / 3.0) * np.cos(y / 3.6) + 0.5 * x
    image = Image(array=(clean + np.random.default_rng(2).normal(0, 3.0, clean.shape)).astype(np.float32))
    model = DenoisingModel.build(SMALL, SamplingConfig(), {"name": "toy", "transform": {"name": "none"}}, stages=())
    model.student = OversmoothingStudent(SMALL)
    fused = denoise_image(image, model, mode="fast")
    plain = denoise_image(image, model, mode="fast", fusion=False)
    assert fused.details["fusion"] and fused.details["observation_share"] >= 0.3
    assert not plain.details["fusion"] and "observation_share" not in plain.details
    data_range = float(clean.max() - clean.min())
    assert psnr(clean, fused.image.array, data_range=data_range) > psnr(clean, plain.image.array,
                                                                        data_range=data_range) + 3.0
    assert np.array_equal(image.array, (clean + np.random.default_rng(2).normal(0, 3.0, clean.shape)).astype(np.float32))


class OversmoothingBlindSpot(OversmoothingStudent):
    """The same blur as a blind-spot network's estimate, for the modes built on one."""

    def estimate(self, y):
        return self(y)


def nearly_clean_volume(edges: bool) -> tuple:
    """(clean, noisy): 9 slices of fine texture and a bright disc (`edges`) or of a smooth ramp alone, in a range of
    about 1000, under faint noise of a 1.2-pixel kernel (std 2): a nearly clean scan, whose reading is neither white
    nor strong."""
    zz, yy, xx = np.mgrid[0:9, 0:64, 0:64]
    clean = 1000.0 + 12.0 * xx + 3.0 * yy
    if edges:
        clean = clean + 600.0 * ((yy - 32) ** 2 + (xx - 30) ** 2 < 300 + 5 * zz) + 40.0 * np.sin(xx / 1.3) * np.cos(
            yy / 1.7)
    return clean, clean + add_noise(np.zeros(clean.shape), "correlated", 1.2, np.random.default_rng(4), sigma=2.0)


def test_where_the_networks_take_anatomy_with_faint_noise_the_input_is_given_back():
    """A nearly clean volume's fine texture and edges, smoothed away by a 2.5D model's networks (the blur): under
    faint noise that does not read white no filter follows them, but what they removed follows the edges, so the
    share of the input Stein's estimate prefers goes back, in Fast (probed) and in the blind-spot modes; the result
    is then far closer to the clean volume than the networks' and no further from it than the input. A smooth ramp
    under the same noise leaves what the blur removed not following any edge: its result stays the networks'."""
    config = NetworkConfig(context_slices=1, bsn_width=8, bsn_depth=2, unet_base=8, unet_mults=(1,), student_width=8)
    model = DenoisingModel.build(config, SamplingConfig(), {"name": "blur", "transform": {"name": "none"}}, stages=())
    model.student, model.bsn = OversmoothingStudent(config), OversmoothingBlindSpot(config)
    clean, noisy = nearly_clean_volume(edges=True)
    reading = binning_noise_reading(noisy)
    assert not reading_is_strong(reading) and not reading_is_faint_and_mildly_correlated(reading)
    image = Image(array=noisy.astype(np.float32), modality="CT")
    for mode in ("fast", "bsn"):
        guarded = denoise_image(image, model, mode=mode, slice_axis=0)
        plain = denoise_image(image, model, mode=mode, slice_axis=0, fusion=False)
        assert guarded.details["anatomy_given_back"] is True and guarded.details["observation_share"] >= 0.5, mode
        assert guarded.details["removed_edge_correlation"] > ANATOMY_EDGE_CORRELATION
        after, before = psnr(clean, guarded.image.array, 1000.0), psnr(clean, plain.image.array, 1000.0)
        assert after > before + 6.0 and after > psnr(clean, noisy, 1000.0) - 0.5, (mode, after, before)
    assert np.array_equal(image.array, noisy.astype(np.float32))
    smooth = Image(array=nearly_clean_volume(edges=False)[1].astype(np.float32), modality="CT")
    kept = denoise_image(smooth, model, mode="fast", slice_axis=0)
    assert kept.details["removed_edge_correlation"] <= ANATOMY_EDGE_CORRELATION
    assert "anatomy_given_back" not in kept.details
    assert np.array_equal(kept.image.array, denoise_image(smooth, model, mode="fast", slice_axis=0,
                                                          fusion=False).image.array)


@pytest.mark.parametrize("kernel", [0.5, 1.2])
def test_under_strong_correlated_noise_a_2d_models_image_is_the_correlated_noise_filters(ct_slice, trained, kernel):
    """Fusing would hand correlated noise back, which a one-pixel blind spot's result keeps much of: a 2D model's
    image is then the filters' with exact variances (its result only picks where the noise is read), above the
    networks' result, in Full and Fast alike."""
    clean, _ = ct_slice
    noise = add_noise(np.zeros_like(clean), "correlated", kernel, np.random.default_rng(1), sigma=150.0)
    noisy = Image(array=(clean + noise).astype(np.float32), modality="CT")
    data_range = float(clean.max() - clean.min())
    for mode in ("full", "fast"):
        asked = denoise_image(noisy, trained, mode=mode)
        unfused = denoise_image(noisy, trained, mode=mode, fusion=False)
        assert asked.details["correlated_noise"], mode
        assert asked.details["filters_made_the_image"] == "correlated-noise filters" and asked.uncertainty is None
        gain = psnr(clean, asked.image.array, data_range=data_range) - psnr(clean, unfused.image.array,
                                                                             data_range=data_range)
        assert gain > 1.0, (mode, gain)
    assert asked.details["observation_share"] is None


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_a_run_reads_the_images_noise_once(ct_slice, trained, monkeypatch, mode):
    """The binning reading (a second of work on a large volume) is taken once for Fast's share or Full's fusion and
    the filters' choice, which both ask for it under strong correlated noise."""
    from DiffDenoiseLib import fusion

    clean, _ = ct_slice
    noise = add_noise(np.zeros_like(clean), "correlated", 0.5, np.random.default_rng(1), sigma=150.0)
    readings = []
    for module in (pipeline, fusion):
        read = module.binning_noise_reading
        monkeypatch.setattr(module, "binning_noise_reading", lambda a, read=read: readings.append(1) or read(a))
    result = denoise_image(Image(array=(clean + noise).astype(np.float32), modality="CT"), trained, mode=mode)
    assert result.details["filters_made_the_image"] == "correlated-noise filters" and len(readings) == 1


def test_under_faint_noise_that_does_not_look_white_no_filter_follows_a_2d_models_result(trained):
    """Fine texture under faint noise reads as not white, and the flattest windows hold texture as much as noise: no
    filter follows a one-pixel blind spot's result. What the short-trained model removed follows the texture's
    edges, so the share of the input Stein's estimate prefers goes back, exactly as details say, and the image is
    far closer to the clean one than the networks' result."""
    yy, xx = np.mgrid[0:64, 0:64]
    clean = (1500.0 + 10.0 * xx + 800.0 * ((yy - 32) ** 2 / 300 + (xx - 32) ** 2 / 150 < 1)
             + 60.0 * np.sin(xx / 1.5) * np.cos(yy / 2.0))
    noisy = clean + add_noise(np.zeros_like(clean), "gaussian", 2.0, np.random.default_rng(1))
    image = Image(array=noisy.astype(np.float32), modality="DX")
    for mode in ("full", "fast"):
        asked = denoise_image(image, trained, mode=mode)
        plain = denoise_image(image, trained, mode=mode, fusion=False)
        raw = plain.image.array.astype(np.float64)
        assert asked.details["correlated_noise"] and not asked.details["wiener"], mode
        assert asked.details["anatomy_given_back"] is True, mode
        assert asked.details["removed_edge_correlation"] > ANATOMY_EDGE_CORRELATION
        share = asked.details["observation_share"]
        np.testing.assert_allclose(asked.image.array, raw + share * (image.array - raw), atol=0.05)
        assert psnr(clean, asked.image.array, 1200.0) > psnr(clean, raw, 1200.0) + 3.0, mode
        if mode == "full":  # the sampler's spread is the result's in the share the networks keep
            np.testing.assert_allclose(asked.uncertainty.array, (1 - share) * plain.uncertainty.array, atol=1e-3)


def test_full_mode_gives_an_uncertainty_map_in_the_input_units(ct_slice, trained):
    _, noisy = ct_slice
    result = denoise_image(noisy, trained, mode="full", pairs=2)
    assert result.uncertainty is not None
    u = result.uncertainty.array
    assert u.shape == noisy.array.shape and np.all(u >= 0) and np.isfinite(u).all()
    assert 0 < float(u.mean()) < 60  # below the noise level, in HU
    assert result.details["pairs"] == 2
    assert denoise_image(noisy, trained, mode="fast").uncertainty is None


def test_same_seed_same_result_and_tiling_has_no_seams(ct_slice, trained):
    _, noisy = ct_slice
    a = denoise_image(noisy, trained, mode="full", seed=3).image.array
    b = denoise_image(noisy, trained, mode="full", seed=3).image.array
    assert np.array_equal(a, b)
    # the networks' result alone: block matching after them may pick other patches for a tiny difference
    whole = denoise_image(noisy, trained, mode="bsn", fusion=False).image.array
    tiled = denoise_image(noisy, trained, mode="bsn", fusion=False, tile=80).image.array
    assert np.abs(tiled - whole).max() < 0.5  # HU, against 60 HU of noise


def test_geometry_survives_read_process_write(trained, tmp_path):
    rng = np.random.default_rng(2)
    volume = sitk.GetImageFromArray((rng.normal(0, 30, (5, 40, 44)) + 200).astype(np.int16))
    volume.SetSpacing((0.7, 0.8, 2.5))
    volume.SetOrigin((-10.0, 20.0, 5.0))
    volume.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    path = tmp_path / "in.nrrd"
    sitk.WriteImage(volume, str(path))
    out = tmp_path / "out.nrrd"
    write_image(denoise_image(read_image(path), trained, mode="fast").image, out)
    result = sitk.ReadImage(str(out))
    assert result.GetSize() == volume.GetSize()
    assert np.allclose(result.GetSpacing(), volume.GetSpacing())
    assert np.allclose(result.GetOrigin(), volume.GetOrigin())
    assert np.allclose(result.GetDirection(), volume.GetDirection())
    assert result.GetPixelID() == sitk.sitkFloat32


def test_bad_images_are_refused_with_a_reason(trained):
    flat = Image(array=np.full((20, 20), 7.0, np.float32), spacing=(1.0, 1.0), origin=(0.0, 0.0),
                 direction=(1.0, 0.0, 0.0, 1.0), modality=None)
    with pytest.raises(ValueError, match="constant"):
        denoise_image(flat, trained)
    bad = flat.array.copy()
    bad[3, 4] = np.nan
    bad[0, 0] = 1.0
    with pytest.raises(ValueError, match="NaN"):
        denoise_image(Image(array=bad, spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0),
                            modality=None), trained)
    with pytest.raises(ValueError, match="unknown mode"):
        denoise_image(flat, trained, mode="fastest")
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(800, 1000, 1000), strides=(0, 0, 0))
    with pytest.raises(ValueError, match="800,000,000 voxels"):
        denoise_image(Image(array=huge, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                            direction=tuple(np.eye(3).ravel()), modality=None), trained)


def test_a_model_without_the_student_says_so(trained):
    partial = DenoisingModel.from_card(trained.card, {"bsn": trained.bsn.state_dict()})
    noisy = Image(array=np.random.default_rng(0).random((16, 16)).astype(np.float32), spacing=(1.0, 1.0),
                  origin=(0.0, 0.0), direction=(1.0, 0.0, 0.0, 1.0), modality=None)
    with pytest.raises(ValueError, match="student"):
        denoise_image(noisy, partial, mode="fast")
    assert torch.is_tensor(next(iter(partial.bsn.state_dict().values())))


@pytest.fixture(scope="module")
def volume_and_model():
    """A noisy anisotropic volume with a rotated frame, and an untrained 2.5D model (one neighbour each side)."""
    rng = np.random.default_rng(3)
    array = (rng.normal(100, 20, (9, 40, 36))).astype(np.float32)
    c, s = np.cos(0.3), np.sin(0.3)
    image = Image(array=array, spacing=(0.8, 0.7, 3.0), origin=(-20.0, 5.0, 40.0),
                  direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0), modality="MR")
    config = NetworkConfig(context_slices=1, bsn_width=8, bsn_depth=2, unet_base=8, unet_mults=(1,), student_width=8)
    model = DenoisingModel.build(config, SamplingConfig(steps=2, t_start=60), {"name": "toy", "transform": {"name": "none"}})
    return image, model.eval()


@pytest.fixture
def networks_make_the_image(monkeypatch):
    """The toy volume's networks' result filtered as under correlated noise, instead of the volumetric filter's."""
    monkeypatch.setattr(pipeline, "volumetric_filter_makes_the_image", lambda config, slices, noise_reading: False)


@pytest.mark.parametrize("mode", ["fast", "bsn"])
def test_a_slice_range_gives_exactly_those_slices_of_the_whole_result(volume_and_model, mode, networks_make_the_image):
    image, model = volume_and_model
    whole = denoise_image(image, model, mode=mode).image.array
    part = denoise_image(image, model, mode=mode, slice_range=(3, 5))
    assert part.image.array.shape == (2, 40, 36)
    np.testing.assert_allclose(part.image.array, whole[3:5], rtol=1e-5, atol=1e-3)
    assert part.details["slices"] == 2 and part.details["slice_range"] == [3, 5]
    assert np.array_equal(denoise_image(image, model, mode=mode, slice_range=(0, 9)).image.array, whole)


def test_a_slice_range_sits_where_those_slices_are_in_space(volume_and_model):
    image, model = volume_and_model
    part = denoise_image(image, model, mode="fast", slice_range=(4, 5)).image
    assert part.spacing == image.spacing and part.direction == image.direction

    def physical(img, index_xyz):
        itk = sitk.GetImageFromArray(img.array)
        itk.SetSpacing(img.spacing), itk.SetOrigin(img.origin), itk.SetDirection(img.direction)
        return np.array(itk.TransformIndexToPhysicalPoint(index_xyz))

    np.testing.assert_allclose(physical(part, (7, 11, 0)), physical(image, (7, 11, 4)), atol=1e-9)
    sideways = denoise_image(image, model, mode="fast", slice_axis=2, slice_range=(30, 32)).image  # x slices
    assert sideways.array.shape == (9, 40, 2)
    np.testing.assert_allclose(physical(sideways, (1, 11, 4)), physical(image, (31, 11, 4)), atol=1e-9)


def test_full_mode_on_a_slice_range_has_an_uncertainty_map_of_that_range(volume_and_model, networks_make_the_image):
    image, model = volume_and_model
    part = denoise_image(image, model, mode="full", slice_range=(2, 3))
    assert part.image.array.shape == part.uncertainty.array.shape == (1, 40, 36)
    assert part.uncertainty.origin == part.image.origin != image.origin
    assert np.all(np.isfinite(part.image.array)) and part.details["residual_scale"] > 0


@pytest.mark.parametrize("bad", [(5, 5), (-1, 2), (3, 10), (8, 9.0 + 1)])
def test_a_slice_range_outside_the_image_is_refused(volume_and_model, bad):
    image, model = volume_and_model
    with pytest.raises(ValueError, match="slice range .* not within the image's 9 slice"):
        denoise_image(image, model, mode="fast", slice_range=bad)


def test_the_rician_bias_of_mr_magnitude_data_is_removed_from_the_result(trained):
    """A magnitude phantom with Rician noise: the result's air, which keeps the noise's floor (sigma sqrt(pi/2))
    when the bias is kept, comes down to the true 0; tissue loses the law's bias; a CT is left alone."""
    y, x = np.meshgrid(np.linspace(-1, 1, 96), np.linspace(-1, 1, 96), indexing="ij")
    clean = np.where(np.hypot(y / 0.8, x / 0.6) < 1.0, 400.0 + 300.0 * (y + 1) / 2, 0.0)
    noisy = add_noise(clean / 1000.0, "rician", 0.05, np.random.default_rng(0)) * 1000.0
    image = Image(array=noisy.astype(np.float32), spacing=(1.0, 1.0), modality="MR")
    before = image.array.copy()
    removed = denoise_image(image, trained, mode="fast")
    kept = denoise_image(image, trained, mode="fast", rician_bias="keep")
    assert np.array_equal(image.array, before)
    assert removed.details["rician_bias_removed"] and removed.details["rician_sigma"] == pytest.approx(50.0, rel=0.1)
    assert not kept.details["rician_bias_removed"]
    air, tissue = clean == 0, clean > 0
    assert kept.image.array[air].mean() > 40.0  # the floor, 1.25 sigma = 63 before the networks smooth it
    assert abs(removed.image.array[air].mean()) < 0.3 * kept.image.array[air].mean()
    # in tissue the bias is about sigma^2 / (2 nu): what came off is the law's bias at the true intensities
    sigma = removed.details["rician_sigma"]
    expected = float((rician_mean(clean, sigma) - clean)[tissue].mean())
    assert float((kept.image.array - removed.image.array)[tissue].mean()) == pytest.approx(expected, rel=0.15)
    as_ct = denoise_image(replace(image, modality="CT"), trained, mode="fast")
    assert not as_ct.details["rician_bias_removed"]
    with pytest.raises(ValueError, match="unknown Rician bias mode"):
        denoise_image(image, trained, rician_bias="sometimes")
