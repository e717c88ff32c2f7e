"""The `diffdenoise` command line: JSON-lines protocol, exit codes, refusals, cancel and resume, geometry.

Models are tiny and trained for a few steps: these tests check the contract, not quality.
"""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DiffDenoiseLib import cli
from DiffDenoiseLib import store as store_module
from DiffDenoiseLib.cli import main
from DiffDenoiseLib.imageio import Image, read_image, write_image
from DiffDenoiseLib.noise import add_noise
from DiffDenoiseLib.wiener import CUBE

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "network": {"bsn_width": 8, "bsn_depth": 2, "unet_base": 8, "unet_mults": [1], "student_width": 8},
    "training": {"batch_size": 2, "bsn_patch": 24, "diffusion_patch": 24, "student_patch": 24, "student_slices": 2},
    "sampling": {"steps": 2},
}
ROTATION_3D = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
ROTATION_2D = (np.cos(0.5), -np.sin(0.5), np.sin(0.5), np.cos(0.5))
PROGRESS_FIELDS = {"stage", "step", "total", "loss", "eta_s"}


def worker_env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def command(*args):
    return [sys.executable, "-m", "DiffDenoiseLib"] + [str(a) for a in args]


def parse(stdout):
    """Every stdout line as an event; json.loads fails the test on any line that is not JSON."""
    events = [json.loads(line) for line in stdout.splitlines()]
    assert all(isinstance(e, dict) and isinstance(e.get("event"), str) for e in events)
    return events


def of_kind(events, kind):
    return [e for e in events if e["event"] == kind]


def run(capfd, *args):
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def denoised_with_log(capfd, *args):
    """`denoise *args --json`, which must succeed: (its events, its log messages joined)."""
    code, out, err = run(capfd, "denoise", *args, "--json")
    assert code == 0, err
    events = parse(out)
    return events, " ".join(e["message"] for e in of_kind(events, "log"))


def assert_filters_made_the_image(capfd, args, spread, made_by: str, log_says: str):
    """`denoise *args --uncertainty spread --json` succeeds, its result says `made_by` made the image, no
    uncertainty map is written, and a log line says `log_says` and that no map was written."""
    code, out, err = run(capfd, "denoise", *args, "--uncertainty", spread, "--json")
    assert code == 0, err
    events = parse(out)
    assert of_kind(events, "result")[0]["details"]["filters_made_the_image"] == made_by
    assert of_kind(events, "result")[0]["uncertainty"] is None and not spread.exists()
    assert any(log_says in e["message"] and "no uncertainty map" in e["message"] for e in of_kind(events, "log"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A noisy 3D MR-like volume and a 2D radiograph-like image with non-trivial geometry, and a tiny config."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:6, 0:40, 0:36]
    disc = 100.0 * ((y - 20) ** 2 + (x - 18) ** 2 < 100) + 20.0
    write_image(Image(array=(disc + rng.normal(0, 10, disc.shape)).astype(np.float32), spacing=(0.8, 0.9, 2.0),
                      origin=(1.0, -2.0, 3.5), direction=ROTATION_3D, modality="MR"), folder / "volume.nrrd")
    yy, xx = np.mgrid[0:48, 0:40]
    chest = 1500.0 + 20.0 * xx + 800.0 * ((yy - 24) ** 2 / 400 + (xx - 20) ** 2 / 200 < 1)
    write_image(Image(array=(chest + rng.normal(0, 60, chest.shape)).astype(np.float32), spacing=(0.15, 0.2),
                      origin=(5.0, -3.0), direction=ROTATION_2D, modality="DX"), folder / "radiograph.nrrd")
    (folder / "tiny.json").write_text(json.dumps(TINY))
    return folder


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A store holding a tiny three-stage model trained by a real `train --json` process."""
    store = tmp_path_factory.mktemp("store")
    proc = subprocess.run(command("train", data / "volume.nrrd", "--name", "tiny", "--store", store, "--config",
                                  data / "tiny.json", "--max-steps", 3, "--device", "cpu", "--json"),
                          capture_output=True, text=True, env=worker_env(), cwd=str(data))
    assert proc.returncode == 0, proc.stderr
    return {"store": store, "events": parse(proc.stdout)}


def test_train_writes_only_json_events_with_the_documented_fields(trained):
    events, store = trained["events"], trained["store"]
    progress = of_kind(events, "progress")
    assert {e["stage"] for e in progress} == {"bsn", "diffusion", "student"}
    assert all(PROGRESS_FIELDS <= set(e) for e in progress)
    assert all(e["step"] == e["total"] == 3 for e in progress if e["step"] > 0)
    assert any(isinstance(e["loss"], float) for e in progress)
    checkpoints = of_kind(events, "checkpoint")
    assert [c["stage"] for c in checkpoints] == ["bsn", "diffusion", "student"]
    assert all(c["step"] == 3 and c["path"].endswith(".pt") for c in checkpoints)
    assert all(isinstance(e["message"], str) and e["message"] for e in of_kind(events, "log"))
    assert not of_kind(events, "error")
    (result,) = of_kind(events, "result")
    assert events[-1] is result
    assert result["model"] == "tiny" and result["stages"] == ["bsn", "diffusion", "student"]
    assert Path(result["path"]) == store / "tiny" and (store / "tiny" / "card.json").is_file()
    assert not (store / ".training").exists(), "the checkpoints of a finished training are removed"


@pytest.mark.parametrize("name", ["volume.nrrd", "radiograph.nrrd"])
def test_denoise_keeps_shape_and_geometry_of_2d_and_3d_images(capfd, data, trained, tmp_path, name):
    source = data / name
    before = source.read_bytes()
    output = tmp_path / "denoised.nii.gz"
    code, out, err = run(capfd, "denoise", source, output, "--model", "tiny", "--store", trained["store"], "--json")
    assert code == 0, err
    (result,) = of_kind(parse(out), "result")
    assert result["output"] == str(output) and result["model"] == "tiny" and result["mode"] == "fast"
    original, denoised = read_image(source), read_image(output)
    assert denoised.array.shape == original.array.shape and denoised.array.dtype == np.float32
    np.testing.assert_allclose(denoised.spacing, original.spacing, rtol=1e-6)
    np.testing.assert_allclose(denoised.origin, original.origin, atol=1e-5)
    np.testing.assert_allclose(denoised.direction, original.direction, atol=1e-6)
    assert np.isfinite(denoised.array).all() and not np.allclose(denoised.array, original.array)
    assert source.read_bytes() == before, "the input is never modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["denoised.nii.gz"], "no temporary file is left"


def test_padding_outside_the_field_of_view_is_left_as_it_was_and_the_log_says_so(capfd, data, trained, tmp_path):
    image = read_image(data / "radiograph.nrrd")
    array = image.array.copy()
    array[:6, :6] = -3024.0
    source, output = tmp_path / "padded.nrrd", tmp_path / "out.nrrd"
    write_image(Image(array=array, spacing=image.spacing, origin=image.origin, direction=image.direction,
                      modality="CT"), source)
    code, out, err = run(capfd, "denoise", source, output, "--model", "tiny", "--store", trained["store"], "--json")
    assert code == 0, err
    events = parse(out)
    assert of_kind(events, "result")[0]["details"]["padding"] == {"value": -3024.0, "voxels": 36}
    assert any("36 voxels of padding outside the field of view" in e["message"] for e in of_kind(events, "log"))
    denoised = read_image(output).array
    assert np.all(denoised[:6, :6] == -3024.0) and denoised[6:, 6:].min() > 0


def test_full_mode_writes_the_uncertainty_map_and_people_get_a_progress_bar(capfd, data, trained, tmp_path):
    output, spread = tmp_path / "full.nrrd", tmp_path / "spread.nrrd"
    code, out, err = run(capfd, "denoise", data / "volume.nrrd", output, "--model", "tiny", "--mode", "full",
                         "--steps", 2, "--pairs", 2, "--uncertainty", spread, "--store", trained["store"])
    assert code == 0, err
    assert out == "", "without --json stdout stays empty"
    # 6 slices: the blind-spot and SRDS passes, then the hard-thresholding and Wiener passes (a 2D model), and the
    # two probes choosing the noise's weight in the Wiener step
    assert "denoise   [" in err and "26/26" in err and f"wrote {output}" in err
    assert re.search(r"It weighed the noise (1|1\.3|1\.7|2\.2) times, as recorrupted copies of the image chose", err)
    uncertainty = read_image(spread)
    assert uncertainty.array.shape == read_image(output).array.shape and (uncertainty.array >= 0).all()
    assert uncertainty.spacing == read_image(data / "volume.nrrd").spacing


def test_no_fusion_keeps_the_blind_estimate_for_comparison(capfd, data, trained, tmp_path):
    outputs = {}
    for flags in ((), ("--no-fusion",)):
        output = tmp_path / f"bsn{len(flags)}.nrrd"
        code, out, err = run(capfd, "denoise", data / "radiograph.nrrd", output, "--model", "tiny", "--mode", "bsn",
                             *flags, "--store", trained["store"])
        assert code == 0, err
        outputs[flags] = read_image(output).array
    assert not np.allclose(outputs[()], outputs[("--no-fusion",)])


def test_fast_mode_says_what_share_of_the_input_it_gave_back_and_that_it_filtered(capfd, data, trained, tmp_path, monkeypatch):
    monkeypatch.setattr("DiffDenoiseLib.pipeline.choose_observation_share", lambda *args: 0.2)
    for flags in ((), ("--no-fusion",)):
        events, messages = denoised_with_log(capfd, data / "radiograph.nrrd", tmp_path / f"fast{len(flags)}.nrrd",
                                             "--model", "tiny", *flags, "--store", trained["store"])
        (result,) = of_kind(events, "result")
        if flags:
            assert "gave back" not in messages and "observation_share" not in result["details"]
            assert "Wiener" not in messages
        else:
            assert "gave back 20% of the difference" in messages and result["details"]["observation_share"] == 0.2
            assert "Wiener filter of the input, guided by the networks' result averaged with the image's own " \
                   "hard-thresholding estimate, gave back" in messages
            # strong noise with a binning ratio above 1.3: both filters read its shape, and keep the patches' DCT
            assert result["details"]["noise_shape_read"] is True and "wiener_noise_scale" not in result["details"]
            assert "both filters read how it spreads" in messages and "weighed the noise" not in messages


def test_self_ensemble_views_are_chosen_on_the_command_line(capfd, data, trained, tmp_path):
    outputs = {}
    for views in (1, 8):
        output = tmp_path / f"bsn{views}.nrrd"
        code, out, err = run(capfd, "denoise", data / "radiograph.nrrd", output, "--model", "tiny", "--mode", "bsn",
                             "--self-ensemble", views, "--store", trained["store"], "--json")
        assert code == 0, err
        assert f'"self_ensemble": {views}' in out
        outputs[views] = read_image(output).array
    assert not np.allclose(outputs[1], outputs[8])
    code, _, err = run(capfd, "denoise", data / "radiograph.nrrd", tmp_path / "x.nrrd", "--model", "tiny",
                       "--self-ensemble", 3, "--store", trained["store"])
    assert code == 2 and "--self-ensemble" in err


def test_preview_shows_before_after_and_what_was_removed(capfd, data, trained, tmp_path):
    output, picture = tmp_path / "out.nrrd", tmp_path / "before_after.png"
    code, out, err = run(capfd, "denoise", data / "radiograph.nrrd", output, "--model", "tiny", "--preview", picture,
                         "--store", trained["store"], "--json")
    assert code == 0, err
    assert of_kind(parse(out), "result")[0]["preview"] == str(picture)
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(picture)))
    height, width = read_image(data / "radiograph.nrrd").array.shape
    scale = png.shape[0] // height
    assert png.dtype == np.uint8 and png.shape == (height * scale, (3 * width + 8) * scale)
    before, after = png[:, : width * scale].astype(float), png[:, (width + 4) * scale: (2 * width + 4) * scale]
    assert before.std() > 20 and not np.array_equal(before, after)
    code, out, err = run(capfd, "denoise", data / "radiograph.nrrd", tmp_path / "b.nrrd", "--model", "tiny",
                         "--preview", tmp_path / "p.jpg", "--store", trained["store"])
    assert code == 2 and ".png" in err and not (tmp_path / "b.nrrd").exists()


def test_slices_denoises_a_sub_volume_written_in_place_with_its_preview(capfd, data, trained, tmp_path):
    source = data / "volume.nrrd"
    whole, part, picture = tmp_path / "whole.nrrd", tmp_path / "part.nrrd", tmp_path / "part.png"
    assert run(capfd, "denoise", source, whole, "--model", "tiny", "--store", trained["store"])[0] == 0
    code, out, err = run(capfd, "denoise", source, part, "--model", "tiny", "--slices", "2:4", "--preview", picture,
                         "--store", trained["store"], "--json")
    assert code == 0, err
    (result,) = of_kind(parse(out), "result")
    assert result["shape"] == [2, 40, 36] and result["details"]["slice_range"] == [2, 4]
    original, full, sub = read_image(source), read_image(whole), read_image(part)
    np.testing.assert_allclose(sub.array, full.array[2:4], rtol=1e-5, atol=1e-3)
    expected = np.asarray(original.origin) + np.reshape(original.direction, (3, 3)) @ [0, 0, 2 * original.spacing[2]]
    np.testing.assert_allclose(sub.origin, expected, atol=1e-5)
    assert sitk.ReadImage(str(picture)).GetSize()[1] >= 40


def test_train_flags_choose_2_5d_context_and_the_noise_transform(capfd, data, tmp_path):
    store = tmp_path / "store"
    code, out, err = run(capfd, "train", data / "volume.nrrd", "--name", "ctx", "--store", store, "--config",
                         data / "tiny.json", "--max-steps", 2, "--context-slices", 1, "--noise", "poisson",
                         "--blind-spot-radius", 1, "--json")
    assert code == 0, err
    card = json.loads((store / "ctx" / "card.json").read_text())
    assert card["architecture"]["context_slices"] == 1 and card["architecture"]["blind_spot_radius"] == 1
    assert card["transform"]["name"] == "anscombe"
    code, out, err = run(capfd, "denoise", data / "volume.nrrd", tmp_path / "o.nrrd", "--model", "ctx",
                         "--store", store, "--slice-axis", "x", "--json")
    assert code == 0, err
    assert of_kind(parse(out), "result")[0]["details"]["slice_axis"] == 2
    # across z the 6 slices of white noise go to the volumetric filter: the log says so, and Full writes no
    # uncertainty map, since the networks did not run
    assert_filters_made_the_image(capfd, (data / "volume.nrrd", tmp_path / "z.nrrd", "--model", "ctx", "--store",
                                          store, "--mode", "full"), tmp_path / "spread.nrrd", "volumetric filter",
                                  "the volumetric filter's")
    # a 2.5D model needs neighbouring slices: a 2D radiograph is refused with the reason
    code, out, err = run(capfd, "denoise", data / "radiograph.nrrd", tmp_path / "r.nrrd", "--model", "ctx",
                         "--store", store, "--json")
    assert code == 2 and "2.5D" in of_kind(parse(out), "error")[0]["message"]
    code, out, err = run(capfd, "denoise", data / "radiograph.nrrd", tmp_path / "r.nrrd", "--model", "ctx",
                         "--store", store, "--slice-axis", "y", "--json")
    assert code == 2 and "needs a volume" in of_kind(parse(out), "error")[0]["message"]
    assert not (tmp_path / "r.nrrd").exists()


def test_a_one_pixel_2_5d_model_under_strong_correlated_noise_is_told_of_the_model_made_for_it(capfd, data,
                                                                                               tmp_path):
    """A 2.5D model's one-pixel result would keep correlated noise, so the volumetric filter, which reads the
    noise's shape, makes the image, and the log says so; under noise of a 1.2-pixel kernel, which the shipped 2.5D
    model for correlated noise separates better, it also names that model, and the result names it for the Slicer
    panel; under noise of a 0.5-pixel kernel, which that filter suits best, it names none, faint or strong."""
    store = tmp_path / "store"
    code, out, err = run(capfd, "train", data / "volume.nrrd", "--name", "one-pixel-2.5d", "--store", store,
                         "--config", data / "tiny.json", "--max-steps", 2, "--context-slices", 1, "--json")
    assert code == 0, err
    z, y, x = np.mgrid[0:6, 0:48, 0:48]
    clean = 100.0 * ((y - 24) ** 2 + (x - 24) ** 2 < 150) + 20.0
    for kernel, named in ((1.2, "correlated-noise-2.5d"), (0.5, None)):
        noise = add_noise(np.zeros(clean.shape), "correlated", kernel, np.random.default_rng(3), sigma=0.1) * 1000
        write_image(Image(array=(clean + noise).astype(np.float32), modality="MR"), tmp_path / "correlated.nrrd")
        events, messages = denoised_with_log(capfd, tmp_path / "correlated.nrrd", tmp_path / "out.nrrd", "--model",
                                             "one-pixel-2.5d", "--store", store, "--slice-axis", "z")
        assert "so the image is the volumetric filter's" in messages and "spread between neighbouring" in messages
        suggested = of_kind(events, "result")[0].get("suggested_model")
        assert suggested == (named and {"model": named, "noise": "correlated"}), kernel
        assert (f"--model {named}, made for such noise" in messages) == bool(named)
    # too few slices for the volumetric filter: the networks' result, and the advice to take the model for such noise
    noise = add_noise(np.zeros(clean.shape), "correlated", 1.2, np.random.default_rng(3), sigma=0.1) * 1000
    write_image(Image(array=(clean + noise)[:CUBE - 1].astype(np.float32), modality="MR"), tmp_path / "short.nrrd")
    events, messages = denoised_with_log(capfd, tmp_path / "short.nrrd", tmp_path / "out.nrrd", "--model",
                                         "one-pixel-2.5d", "--store", store, "--slice-axis", "z")
    assert "a one-pixel blind spot cannot separate such noise well; --model correlated-noise-2.5d can" in messages
    assert of_kind(events, "result")[0]["suggested_model"] == {"model": "correlated-noise-2.5d", "noise": "correlated"}
    # faint noise of a 0.5-pixel kernel (a sharp reconstruction kernel's) goes to the filter too, and the log says why
    noise = add_noise(np.zeros(clean.shape), "correlated", 0.5, np.random.default_rng(3), sigma=1.0)
    write_image(Image(array=(clean + noise).astype(np.float32), modality="CT"), tmp_path / "faint.nrrd")
    events, messages = denoised_with_log(capfd, tmp_path / "faint.nrrd", tmp_path / "out.nrrd", "--model",
                                         "one-pixel-2.5d", "--store", store, "--slice-axis", "z")
    assert "The noise is faint and looks mildly correlated" in messages
    assert "so the image is the volumetric filter's" in messages and "does not look white but is faint" not in messages
    assert of_kind(events, "result")[0].get("suggested_model") is None


def test_the_log_says_when_the_input_was_given_back_because_the_networks_took_anatomy(capfd, data, tmp_path):
    """A nearly clean volume (edges, faint noise of a 1.2-pixel kernel) and a barely trained 2.5D model, whose result
    takes the edges with the noise: the log says how much of the input went back and why, in its account of the faint
    noise; --no-fusion keeps the networks' result and says nothing of it."""
    store = tmp_path / "store"
    code, out, err = run(capfd, "train", data / "volume.nrrd", "--name", "one-pixel-2.5d", "--store", store,
                         "--config", data / "tiny.json", "--max-steps", 2, "--context-slices", 1, "--json")
    assert code == 0, err
    z, y, x = np.mgrid[0:6, 0:48, 0:48]
    clean = 1000.0 + 600.0 * ((y - 24) ** 2 + (x - 22) ** 2 < 150 + 10 * z) + 8.0 * x
    noise = add_noise(np.zeros(clean.shape), "correlated", 1.2, np.random.default_rng(3), sigma=2.0)
    write_image(Image(array=(clean + noise).astype(np.float32), modality="CT"), tmp_path / "clean.nrrd")
    for flags in ((), ("--no-fusion",)):
        events, messages = denoised_with_log(capfd, tmp_path / "clean.nrrd", tmp_path / "out.nrrd", "--model",
                                             "one-pixel-2.5d", "--store", store, "--slice-axis", "z", *flags)
        details = of_kind(events, "result")[0]["details"]
        if flags:
            assert "anatomy_given_back" not in details and "took fine anatomy" not in messages
        else:
            assert details["anatomy_given_back"] is True
            assert (f"under faint noise they took fine anatomy with it, so {details['observation_share']:.0%} of the "
                    "difference between the input and their result was given back") in messages
            assert "Fast mode gave back" not in messages
            # one account: the faint noise's message says what became of the networks' result, and only once
            assert messages.count("took fine anatomy") == 1 and "The Wiener filter, which needs white noise" in messages
            assert "Observation fusion and the Wiener filter, which need white noise, were skipped" not in messages
            # what they took was anatomy: no advice to take a wider blind spot, which would take more of it
            assert "separates it better" not in messages and of_kind(events, "result")[0].get("suggested_model") is None


def test_json_mode_keeps_stray_prints_off_stdout(capfd, data, trained, tmp_path, monkeypatch):
    real = cli.denoise_image

    def chatty(*args, **kwargs):
        print("a library print")
        os.write(1, b"a C library writing to file descriptor 1\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "denoise_image", chatty)
    code, out, err = run(capfd, "denoise", data / "volume.nrrd", tmp_path / "o.nrrd", "--model", "tiny",
                         "--store", trained["store"], "--json")
    assert code == 0
    parse(out)
    assert "a library print" in err and "file descriptor 1" in err


def test_without_a_model_the_shipped_default_for_the_modality_is_used_and_named(capfd, data, trained, tmp_path,
                                                                                monkeypatch):
    shipped = tmp_path / "shipped"
    for name, default_for in (("ct-default", ["CT"]), ("mr-default", ["MR", "OT", None])):
        shutil.copytree(trained["store"] / "tiny", shipped / name)
        card = json.loads((shipped / name / "card.json").read_text())
        (shipped / name / "card.json").write_text(json.dumps(dict(card, name=name, default_for=default_for)))
    monkeypatch.setattr(store_module, "SHIPPED_DIR", shipped)
    ct = read_image(data / "volume.nrrd")
    write_image(Image(array=ct.array * 10 - 1000, spacing=ct.spacing, modality="CT"), tmp_path / "ct.nrrd")
    for source, expected in (("ct.nrrd", "ct-default"), (data / "radiograph.nrrd", "mr-default")):
        code, out, err = run(capfd, "denoise", tmp_path / source, tmp_path / f"{expected}.nrrd",
                             "--store", trained["store"], "--json")
        assert code == 0, err
        events = parse(out)
        assert any(f"'{expected}'" in e["message"] for e in of_kind(events, "log"))
        assert of_kind(events, "result")[0]["model"] == expected


def test_correlated_noise_without_a_model_gets_the_model_made_for_it(capfd, data, trained, tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    for name, card_fields in (("mr-default", {"default_for": ["MR", None]}),
                              ("wide-spot", {"default_for": [], "default_for_noise": "correlated"}),
                              ("broad-spot-2.5d", {"default_for": [], "default_for_noise": "correlated"})):
        shutil.copytree(trained["store"] / "tiny", shipped / name)
        card = json.loads((shipped / name / "card.json").read_text())
        if name.endswith("2.5d"):  # only the card says so: a single image never loads it
            card["architecture"] = dict(card["architecture"], context_slices=2)
        (shipped / name / "card.json").write_text(json.dumps(dict(card, name=name, **card_fields)))
    monkeypatch.setattr(store_module, "SHIPPED_DIR", shipped)
    yy, xx = np.mgrid[0:48, 0:40]
    clean = 1500.0 + 20.0 * xx + 800.0 * ((yy - 24) ** 2 / 400 + (xx - 20) ** 2 / 200 < 1)
    rng = np.random.default_rng(4)
    for kind, expected in (("gaussian", "mr-default"), ("correlated", "wide-spot")):
        noisy = add_noise(np.zeros_like(clean), kind, 1.2 if kind == "correlated" else 0.1, rng) * 1600 + clean
        write_image(Image(array=noisy.astype(np.float32), modality="DX"), tmp_path / f"{kind}.nrrd")
        code, out, err = run(capfd, "denoise", tmp_path / f"{kind}.nrrd", tmp_path / f"{kind}-out.nrrd",
                             "--store", trained["store"], "--json")
        assert code == 0, err
        events = parse(out)
        assert of_kind(events, "result")[0]["model"] == expected
        if kind == "correlated":
            assert any("the default for spatially correlated noise" in e["message"] for e in of_kind(events, "log"))
    # with a 2D one-pixel blind spot chosen by hand on an image too small for its filters (48 x 40), the advice names
    # the model made for such noise that fits a 2D image
    events, messages = denoised_with_log(capfd, tmp_path / "correlated.nrrd", tmp_path / "tiny-out.nrrd", "--model",
                                         "tiny", "--store", trained["store"])
    assert "the Wiener filter were skipped" in messages and "--model wide-spot can" in messages
    # the result names it too, for the Slicer panel to say in its own words
    assert of_kind(events, "result")[0]["suggested_model"] == {"model": "wide-spot", "noise": "correlated"}
    # on a larger image the filters make the image as after the model made for such noise (a 2D model's result
    # only picks where the noise is read), so no other model is suggested
    yy, xx = np.mgrid[0:128, 0:112]
    clean = 1500.0 + 8.0 * xx + 800.0 * ((yy - 64) ** 2 / 1600 + (xx - 56) ** 2 / 900 < 1)
    noisy = add_noise(np.zeros_like(clean), "correlated", 1.2, rng) * 1600 + clean
    write_image(Image(array=noisy.astype(np.float32), modality="DX"), tmp_path / "larger.nrrd")
    events, messages = denoised_with_log(capfd, tmp_path / "larger.nrrd", tmp_path / "larger-out.nrrd", "--model",
                                         "tiny", "--store", trained["store"])
    assert "the image is hard thresholding's and the Wiener filter's" in messages and "--model" not in messages
    assert of_kind(events, "result")[0]["suggested_model"] is None


def test_a_nearly_clean_textured_image_is_told_its_noise_is_faint_not_sent_to_a_wider_blind_spot(capfd, trained,
                                                                                                    tmp_path):
    """Fine texture under faint noise reads as not white (the reading sees the texture), but far below the noise a
    wider blind spot is chosen for: the log says the reading cannot tell which. Where the tiny model's result took the
    texture along an ellipse's edge, what it removed follows the edges: the input goes back and no wider blind spot is
    offered, as it would take more; on the texture and a ramp alone, with no edge to follow, the wider blind spot is
    offered only as a choice for the case that it is noise."""
    yy, xx = np.mgrid[0:64, 0:64]
    for ellipse, strength in ((800.0, "1.28%"), (0.0, "2.02%")):
        clean = (1500.0 + 10.0 * xx + ellipse * ((yy - 32) ** 2 / 300 + (xx - 32) ** 2 / 150 < 1)
                 + 60.0 * np.sin(xx / 1.5) * np.cos(yy / 2.0))
        noisy = clean + add_noise(np.zeros_like(clean), "gaussian", 2.0, np.random.default_rng(1))
        write_image(Image(array=noisy.astype(np.float32), modality="DX"), tmp_path / "texture.nrrd")
        events, messages = denoised_with_log(capfd, tmp_path / "texture.nrrd", tmp_path / "texture-out.nrrd",
                                             "--model", "tiny", "--store", trained["store"])
        assert f"does not look white but is faint (its std about {strength} of the intensity range" in messages
        assert "or fine anatomy, which the noise reading cannot tell apart" in messages
        assert "The noise looks spatially correlated" not in messages
        offered = "if it is noise, --model correlated-noise-default separates it better" in messages
        suggested = of_kind(events, "result")[0]["suggested_model"]
        if ellipse:
            assert "they took fine anatomy with it" in messages and not offered and suggested is None
        else:
            assert "took fine anatomy" not in messages
            assert offered and suggested == {"model": "correlated-noise-default", "noise": "faint"}


def test_under_correlated_noise_the_log_says_the_filters_made_the_image_and_no_uncertainty_map_is_written(
        capfd, tmp_path):
    """The shipped 2D correlated-noise model on a radiograph-like image with correlated noise, Full mode: hard
    thresholding and the Wiener filter make the image, so the log says so and no uncertainty map is written."""
    yy, xx = np.mgrid[0:64, 0:64]
    clean = 1500.0 + 10.0 * xx + 800.0 * ((yy - 32) ** 2 / 300 + (xx - 32) ** 2 / 150 < 1)
    noisy = clean + 1600 * add_noise(np.zeros_like(clean), "correlated", 1.2, np.random.default_rng(8))
    write_image(Image(array=noisy.astype(np.float32), modality="DX"), tmp_path / "chest.nrrd")
    assert_filters_made_the_image(capfd, (tmp_path / "chest.nrrd", tmp_path / "out.nrrd", "--model",
                                          "correlated-noise-default", "--mode", "full"), tmp_path / "spread.nrrd",
                                  "correlated-noise filters", "hard thresholding's and the Wiener filter's")


def test_fast_on_a_volume_under_correlated_noise_says_its_groups_were_matched_on_the_blind_spot_estimate(
        capfd, tmp_path):
    """The shipped 2.5D correlated-noise model in Fast mode: the log says the Wiener filter's groups were matched on
    the blind-spot estimate and the student set the gains."""
    zz, yy, xx = np.mgrid[0:5, 0:48, 0:48]
    clean = 1500.0 + 10.0 * xx + 800.0 * ((yy - 24) ** 2 / 200 + (xx - 24) ** 2 / 100 < 1)
    noisy = clean + 1600 * add_noise(np.zeros_like(clean), "correlated", 1.2, np.random.default_rng(8))
    write_image(Image(array=noisy.astype(np.float32), modality="CT"), tmp_path / "head.nrrd")
    code, out, err = run(capfd, "denoise", tmp_path / "head.nrrd", tmp_path / "out.nrrd", "--model",
                         "correlated-noise-2.5d", "--slices", "2:3", "--json")
    assert code == 0, err
    events = parse(out)
    assert of_kind(events, "result")[0]["details"]["groups_matched_on"] == "blind-spot estimate"
    assert any("its groups matched on the blind-spot estimate, the student's result setting the gains" in e["message"]
               for e in of_kind(events, "log"))


def colour_image(path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9, 3), np.uint8), isVector=True), str(path))


def image_with(value):
    def write(path):
        array = np.ones((4, 10, 10), np.float32)
        array[1, 2, 3] = value
        write_image(Image(array=array), path)
    return write


BAD_INPUTS = {
    # name: (how to make the input, extra arguments, output name, words the message must contain)
    "missing file": (None, [], "out.nrrd", "does not exist"),
    "empty file": (lambda p: p.write_bytes(b""), [], "out.nrrd", "not an image"),
    "text file": (lambda p: p.write_text("patient notes, not an image\n"), [], "out.nrrd", "not an image"),
    "NaN voxels": (image_with(np.nan), [], "out.nrrd", "NaN or infinite"),
    "Inf voxels": (image_with(np.inf), [], "out.nrrd", "NaN or infinite"),
    "colour image": (colour_image, [], "out.nrrd", "colour or vector"),
    "unknown model": ("volume", ["--model", "nope"], "out.nrrd", "unknown model 'nope'; available models: "),
    "missing output folder": ("volume", [], "no/such/folder/out.nrrd", "output folder"),
    "unknown mode": ("volume", ["--mode", "turbo"], "out.nrrd", "invalid choice: 'turbo'"),
    "uncertainty in fast mode": ("volume", ["--uncertainty", "u.nrrd"], "out.nrrd", "--uncertainty needs --mode full"),
    "unwritable format": ("volume", [], "out.png", "cannot write"),
    "output overwrites the input": ("volume", [], "input.nrrd", "would overwrite"),
    "bad step count": ("volume", ["--steps", "0"], "out.nrrd", "--steps"),
    "unknown device": ("volume", ["--device", "tpu"], "out.nrrd", "unknown device 'tpu'"),
    "slices past the end": ("volume", ["--slices", "4:9"], "out.nrrd", "slice range 4:9 is not within the image's 6 slice"),
    "slices not numbers": ("volume", ["--slices", "mid"], "out.nrrd", "expected START:STOP or one slice number"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_clear_sentence_and_no_output(capfd, data, trained, tmp_path, case):
    make, extra, output_name, words = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    source = work / "input.nrrd"
    if make == "volume":
        shutil.copy(data / "volume.nrrd", source)
    elif make is not None:
        make(source)
    inputs_before = sorted(p.name for p in work.iterdir())
    extra = [str(work / a) if a.endswith(".nrrd") else a for a in extra]
    if "--model" not in extra:
        extra += ["--model", "tiny"]
    code, out, err = run(capfd, "denoise", source, work / output_name, *extra, "--store", trained["store"], "--json")
    assert code == 2
    events = parse(out)
    (error,) = of_kind(events, "error")
    assert words in error["message"] and "\n" not in error["message"]
    assert "Traceback" not in err
    assert sorted(p.name for p in work.iterdir()) == inputs_before, "no output or temporary file appears"


def test_bad_input_without_json_is_one_line_on_stderr(capfd, data, trained, tmp_path):
    code, out, err = run(capfd, "denoise", tmp_path / "missing.nrrd", tmp_path / "o.nrrd", "--model", "tiny",
                         "--store", trained["store"])
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "missing.nrrd" in err and err.count("\n") == 1


@pytest.mark.parametrize("args, words", [
    ([], "required"),
    (["train", "x.nrrd"], "--name"),
    (["denoise", "only-input.nrrd"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2_and_are_reported_as_events(capfd, args, words):
    code, out, err = run(capfd, *args, "--json")
    assert code == 2
    (error,) = of_kind(parse(out), "error")
    assert words in error["message"] and "Traceback" not in err


@pytest.mark.parametrize("args, words", [
    (["--name", "../escape"], "invalid model name"),
    (["--name", "ok", "--stages", "bsn,magic"], "unknown stage"),
    (["--name", "ok", "--stages", "student"], "needs a trained bsn stage"),
    (["--name", "ok", "--from", "nope"], "unknown model 'nope'"),
    (["--name", "ok", "--config", "bad-types.json"], "invalid training settings"),
    (["--name", "ok", "--config", "unknown-section.json"], "sections among"),
    (["--name", "ok", "--from", "tiny", "--context-slices", "1"], "keeps its architecture"),
    (["--name", "ok", "--from", "tiny", "--noise", "poisson"], "keeps its architecture"),
    (["--name", "ok", "--context-slices", "-1"], "must be 0 or more"),
])
def test_bad_training_requests_exit_2(capfd, data, trained, tmp_path, args, words):
    (tmp_path / "bad-types.json").write_text(json.dumps({"network": {"bsn_width": "wide"}}))
    (tmp_path / "unknown-section.json").write_text(json.dumps({"optimiser": {}}))
    if "--config" not in args:
        args = args + ["--config", data / "tiny.json"]
    args = [tmp_path / a if str(a).endswith(".json") and "/" not in str(a) else a for a in args]
    code, out, err = run(capfd, "train", data / "volume.nrrd", *args, "--store", trained["store"],
                         "--max-steps", 2, "--json")
    assert code == 2, err
    assert words in of_kind(parse(out), "error")[0]["message"]
    assert not (trained["store"] / "ok").exists()


def test_a_forged_model_is_refused_and_its_code_never_runs(capfd, data, trained, tmp_path):
    marker = tmp_path / "code-ran"

    class Forged:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    forged = tmp_path / "gift-model"
    shutil.copytree(trained["store"] / "tiny", forged)
    with open(forged / "student.pt", "wb") as handle:
        pickle.dump({"net.0.weight": Forged()}, handle, protocol=2)
    code, out, err = run(capfd, "denoise", data / "volume.nrrd", tmp_path / "o.nrrd", "--model", forged, "--json")
    assert code == 2
    assert "student.pt was refused" in of_kind(parse(out), "error")[0]["message"]
    assert not marker.exists() and not (tmp_path / "o.nrrd").exists()


def test_an_internal_error_exits_1_and_points_to_a_log_with_the_traceback(capfd, data, trained, tmp_path,
                                                                         monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure deep inside")

    monkeypatch.setattr(cli, "denoise_image", broken)
    code, out, err = run(capfd, "denoise", data / "volume.nrrd", tmp_path / "o.nrrd", "--model", "tiny",
                         "--store", trained["store"], "--json")
    assert code == 1
    message = of_kind(parse(out), "error")[0]["message"]
    assert "internal error" in message and "simulated failure" in message
    log = Path(message.rsplit("the details are in ", 1)[1])
    assert log.parent == trained["store"] / "logs"
    text = log.read_text()
    assert "Traceback" in text and "simulated failure deep inside" in text and "denoise" in text
    assert "Traceback" not in err and not (tmp_path / "o.nrrd").exists()


def test_a_stop_file_cancels_training_with_a_checkpoint_and_exit_3(capfd, data, tmp_path):
    stop = tmp_path / "stop"
    stop.write_text("")
    code, out, err = run(capfd, "train", data / "volume.nrrd", "--name", "stopped", "--store", tmp_path / "store",
                         "--config", data / "tiny.json", "--max-steps", 50, "--stop-file", stop, "--json")
    assert code == 3, err
    events = parse(out)
    (checkpoint,) = of_kind(events, "checkpoint")
    assert Path(checkpoint["path"]).is_file() and checkpoint["stage"] == "bsn"
    assert not of_kind(events, "result") and not (tmp_path / "store" / "stopped").exists()


def test_a_stop_file_cancels_denoising_without_output(capfd, data, trained, tmp_path):
    stop = tmp_path / "stop"
    stop.write_text("")
    code, out, err = run(capfd, "denoise", data / "volume.nrrd", tmp_path / "o.nrrd", "--model", "tiny",
                         "--store", trained["store"], "--stop-file", stop, "--json")
    assert code == 3 and not (tmp_path / "o.nrrd").exists()
    assert not of_kind(parse(out), "result")


def read_until(proc, predicate):
    """Events from a running worker up to and including the first one `predicate` accepts."""
    seen = []
    for line in proc.stdout:
        seen.append(json.loads(line))
        if predicate(seen[-1]):
            return seen
    raise AssertionError(f"the worker ended before the awaited event; events: {seen}")


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM is POSIX")
def test_sigterm_saves_a_checkpoint_exits_3_and_the_same_command_resumes(data, tmp_path):
    store = tmp_path / "store"
    args = ["train", data / "volume.nrrd", "--name", "long", "--store", store, "--config", data / "tiny.json",
            "--device", "cpu", "--json", "--max-steps"]
    proc = subprocess.Popen(command(*args, 100000), stdout=subprocess.PIPE, text=True, env=worker_env())
    try:
        read_until(proc, lambda e: e["event"] == "progress" and e["step"] > 0)
        proc.send_signal(signal.SIGTERM)
        rest = parse(proc.stdout.read())
    finally:
        proc.stdout.close()
        code = proc.wait()
    assert code == 3
    (checkpoint,) = of_kind(rest, "checkpoint")
    assert checkpoint["stage"] == "bsn" and checkpoint["step"] > 0 and Path(checkpoint["path"]).is_file()
    assert not (store / "long").exists()

    finish = subprocess.run(command(*args, checkpoint["step"] + 5), capture_output=True, text=True,
                            env=worker_env())
    assert finish.returncode == 0, finish.stderr
    events = parse(finish.stdout)
    first = of_kind(events, "progress")[0]
    assert first["resumed"] is True and first["stage"] == "bsn" and first["step"] == checkpoint["step"]
    assert not any(e["resumed"] for e in of_kind(events, "progress")[1:])
    assert (store / "long" / "card.json").is_file() and not (store / ".training").exists()


def test_models_lists_the_user_models_with_their_cards(capfd, trained):
    code, out, err = run(capfd, "models", "--store", trained["store"], "--json")
    assert code == 0
    (result,) = of_kind(parse(out), "result")
    mine = [m for m in result["models"] if m["name"] == "tiny"]
    assert len(mine) == 1 and mine[0]["source"] == "user" and mine[0]["stages"] == ["bsn", "diffusion", "student"]
    assert mine[0]["architecture"]["bsn_width"] == 8 and "torch_version" in mine[0]
    code, out, err = run(capfd, "models", "--store", trained["store"])
    assert code == 0 and "tiny" in out and "user" in out


def test_info_reports_devices_memory_and_versions(capfd):
    code, out, err = run(capfd, "info", "--json")
    assert code == 0
    (info,) = of_kind(parse(out), "result")
    assert info["devices"][0]["name"] == "cpu" and info["cpu_count"] >= 1
    assert set(info["versions"]) >= {"diffdenoise", "torch", "numpy", "SimpleITK", "python"}
    assert info["default_device"] in ("cpu", "cuda", "mps") and info["device_message"]
    code, out, err = run(capfd, "info")
    assert code == 0 and "torch" in out and "CPU cores" in out


def test_the_log_says_when_a_2d_models_filters_read_the_noise_shape(capfd, trained, tmp_path):
    """Strong noise of a 0.45-pixel kernel on a 128 x 128 image reads white, and the 2D filters read its shape: the
    log says so; under white Gaussian noise it does not."""
    y, x = np.mgrid[0:128, 0:128]
    clean = 100.0 * ((y - 64) ** 2 + (x - 64) ** 2 < 1500) + 0.5 * x + 20.0
    for noise, read in (("correlated", True), ("gaussian", False)):
        rng = np.random.default_rng(4)
        added = (add_noise(np.zeros(clean.shape), "correlated", 0.45, rng, sigma=0.1) if noise == "correlated"
                 else rng.normal(0.0, 0.1, clean.shape)) * 150
        write_image(Image(array=(clean + added).astype(np.float32), modality="MR"), tmp_path / "image.nrrd")
        events, messages = denoised_with_log(capfd, tmp_path / "image.nrrd", tmp_path / "out.nrrd", "--model", "tiny",
                                             "--store", trained["store"])
        assert of_kind(events, "result")[0]["details"].get("noise_shape_read", False) is read, noise
        assert ("read how it spreads between neighbouring pixels" in messages) is read, noise
