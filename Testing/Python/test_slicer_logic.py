"""MRML-facing logic on the real Slicer libraries (the `slicer-core` wheel): no Slicer application.

Volumes are loaded through vtkSlicerVolumesLogic, the worker runs as a real
subprocess through the waitForCompletion path, and the slice views' blended
image is computed on the CPU by vtkMRMLSliceLogic.
"""

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("needs the slicer-core wheel", allow_module_level=True)

import SimpleITK as sitk  # noqa: E402
import slicer.util  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

from DiffDenoiseLib.noise import add_noise  # noqa: E402
from DiffDenoiseLib.slicer_logic import (  # noqa: E402
    _CPU_SECONDS_PER_MEGAPIXEL,
    DenoiseLogic,
    DenoiseSettings,
    TrainSettings,
    ijk_to_ras,
)
from DiffDenoiseLib.store import ModelStore  # noqa: E402

# Stands for `python -m DiffDenoiseLib denoise|train ... --json`: a 3x3x3 mean filter, the same
# JSON lines and exit codes, and `--uncertainty` written as the absolute method noise.
FAKE_CLI = textwrap.dedent(
    """
    import json, sys
    import numpy as np, SimpleITK as sitk
    args = sys.argv[sys.argv.index("DiffDenoiseLib") + 1:]
    say = lambda **e: print(json.dumps(e), flush=True)
    if args[0] == "denoise":
        source, target = args[1], args[2]
        image = sitk.ReadImage(source)
        if "--model" in args and args[args.index("--model") + 1] == "missing":
            say(event="error", message="unknown model 'missing'")
            sys.exit(2)
        say(event="progress", stage="denoise", step=0, total=1, loss=None, eta_s=1.0)
        if "--slices" in args:  # one slice, kept in place as the real worker keeps it
            where = [slice(None)] * 3
            k = int(args[args.index("--slices") + 1])
            where["xyz".index(args[args.index("--slice-axis") + 1])] = slice(k, k + 1)
            image = image[tuple(where)]
        smooth = sitk.Mean(sitk.Cast(image, sitk.sitkFloat32), [1, 1, 1])
        sitk.WriteImage(smooth, target)
        # the model "volumetric" stands for a 2.5D model on white noise (the volumetric filter), "volumetric-mild" for
        # a one-pixel 2.5D one under mildly correlated noise (that filter with the noise's covariance),
        # "volumetric-faint" for one under faint such noise, "correlated" for a 2D one under correlated noise (the
        # correlated-noise filters): no uncertainty map
        chosen = args[args.index("--model") + 1] if "--model" in args else None
        made_by = {"volumetric": "volumetric filter", "volumetric-mild": "volumetric filter",
                   "volumetric-faint": "volumetric filter", "correlated": "correlated-noise filters"}.get(chosen)
        if "--uncertainty" in args and not made_by:
            sitk.WriteImage(sitk.Abs(sitk.Cast(image, sitk.sitkFloat32) - smooth), args[args.index("--uncertainty") + 1])
        say(event="progress", stage="denoise", step=1, total=1, loss=None, eta_s=0.0)
        # the model "one-pixel" stands for a one-pixel blind spot's model under correlated noise: the worker
        # suggests the model made for such noise
        suggested = ({"model": "correlated-noise-default", "noise": "correlated"}
                     if "--model" in args and args[args.index("--model") + 1] == "one-pixel" else None)
        details = {"filters_made_the_image": made_by, "correlated_noise": chosen != "volumetric",
                   "faint_noise": chosen == "volumetric-faint"} if made_by else {}
        # the model "magnitude" stands for an MR magnitude volume: its Rician bias is removed unless kept
        bias = args[args.index("--rician-bias") + 1]
        model = args[args.index("--model") + 1] if "--model" in args else ""
        if bias == "remove" or (bias == "auto" and model == "magnitude"):
            details.update(rician_bias_removed=True, rician_sigma=21.5)
        if model == "padded":  # a CT with padding outside its field of view, which the worker leaves as it was
            details.update(padding={"value": -3024.0, "voxels": 1200})
        if model == "anatomy":  # a nearly clean volume whose networks' result took anatomy: part of it given back
            details.update(anatomy_given_back=True, observation_share=0.8, removed_edge_correlation=0.21)
        if model == "weighed":  # a 2D image under white noise: its Wiener step's weight of the noise, chosen on it
            details.update(wiener_noise_scale=2.2)
        say(event="result", output=target, model="fake-mean", seconds=0.5, details=details,
            suggested_model=suggested)
    elif args[0] == "train":
        name = args[args.index("--name") + 1]
        inputs = args[1:args.index("--name")]
        say(event="log", message="training on %d volumes" % len(inputs))
        say(event="result", model=name, inputs=[sitk.ReadImage(p).GetSize() for p in inputs])
    """
)


@pytest.fixture
def mrml(tmp_path):
    """A scene with the logic objects Slicer would register (held here: they are referenced weakly)."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = slicer.vtkSlicerColorLogic()
    color_logic.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Colors", color_logic)
    volumes_logic = slicer.vtkSlicerVolumesLogic()
    volumes_logic.SetMRMLApplicationLogic(app_logic)
    volumes_logic.SetMRMLScene(scene)
    layout_logic = slicer.vtkMRMLLayoutLogic()  # creates the layout and the Red, Green, Yellow slice nodes
    layout_logic.SetMRMLScene(scene)
    slice_logics = {}
    for name in ("Red", "Yellow"):
        slice_logic = slicer.vtkMRMLSliceLogic()
        slice_logic.SetMRMLScene(scene)
        slice_logic.SetMRMLApplicationLogic(app_logic)
        slice_logic.SetSliceNode(scene.GetNodeByID("vtkMRMLSliceNode" + name))
        slice_logic.GetSliceNode().SetDimensions(48, 40, 1)
        slice_logics[name] = slice_logic
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    yield dict(scene=scene, volumes=volumes_logic, slices=slice_logics, layout=layout,
               keep=(app_logic, color_logic, layout_logic))
    scene.Clear(1)


@pytest.fixture
def fake_logic(mrml, tmp_path):
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    temp_root = tmp_path / "jobs"
    temp_root.mkdir()
    return DenoiseLogic(scene=mrml["scene"], python=[sys.executable, str(script)], temp_root=str(temp_root))


def _noisy_volume(path: Path, shape=(6, 20, 24)):
    rng = np.random.default_rng(3)
    clean = np.zeros(shape, np.float32)
    clean[:, 5:15, 6:18] = 100.0
    noisy = (clean + rng.normal(0, 10, shape)).astype(np.int16)
    image = sitk.GetImageFromArray(noisy)
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin((12.0, -30.0, 4.5))
    image.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # rotated, right-handed
    sitk.WriteImage(image, str(path))
    return noisy


def _matrix(node) -> np.ndarray:
    return slicer.util.arrayFromVTKMatrix(ijk_to_ras(node))


def _blended(slice_logic) -> np.ndarray:
    connection = slice_logic.GetImageDataConnection()
    producer = connection.GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(connection.GetIndex())
    return vtk_to_numpy(image.GetPointData().GetScalars()).astype(float)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_volumes_load_through_the_volumes_logic(mrml, tmp_path, suffix):
    path = tmp_path / ("head" + suffix)
    voxels = _noisy_volume(path)
    node = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    assert node.IsA("vtkMRMLScalarVolumeNode")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), voxels)
    assert node.GetSpacing() == pytest.approx((0.8, 0.7, 2.5))


def test_denoise_waits_for_the_worker_and_keeps_geometry_window_and_input(mrml, fake_logic, tmp_path):
    path = tmp_path / "head.nrrd"
    _noisy_volume(path)
    source = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    source.GetDisplayNode().SetAutoWindowLevel(False)
    source.GetDisplayNode().SetWindowLevel(150.0, 40.0)
    before = slicer.util.arrayFromVolume(source).copy()
    source_matrix = _matrix(source)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml["scene"])
    folder = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), "Patient 1")
    hierarchy.CreateItem(folder, source)  # what Slicer's subject hierarchy plugins do for a loaded volume

    outcome = fake_logic.denoise(source, DenoiseSettings(mode="full", uncertainty=True))

    assert outcome.status == "done", outcome.message
    output = outcome.output_volume
    assert output.GetName() == "head denoised"
    np.testing.assert_array_equal(_matrix(output), source_matrix)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(source), before)
    denoised = slicer.util.arrayFromVolume(output)
    assert denoised.shape == before.shape
    assert denoised[:, 7:13, 8:16].std() < 0.5 * before[:, 7:13, 8:16].std()
    display = output.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (150.0, 40.0)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(output)) == folder
    assert output.GetAttribute("DiffDenoise.Model") == "fake-mean"
    assert fake_logic.source_volume(output) is source

    uncertainty = outcome.uncertainty_volume
    assert uncertainty.GetName() == "head uncertainty"
    np.testing.assert_array_equal(_matrix(uncertainty), source_matrix)
    assert uncertainty.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeIron"
    assert os.listdir(fake_logic.temp_root) == []


@pytest.mark.parametrize("model, why", [("volumetric", "looks white, so the volumetric filter"),
                                        ("volumetric-mild", "looks spatially correlated, so the volumetric filter"),
                                        ("volumetric-faint", "looks faint and mildly correlated, so the volumetric"),
                                        ("correlated", "spatially correlated, so block-matching filters")])
def test_full_mode_without_an_uncertainty_map_says_why(mrml, fake_logic, tmp_path, model, why):
    """When filters alone made the image the worker writes no map: the result comes in alone and says why."""
    path = tmp_path / "head.nrrd"
    _noisy_volume(path)
    source = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    outcome = fake_logic.denoise(source, DenoiseSettings(mode="full", uncertainty=True, model=model))
    assert outcome.status == "done", outcome.message
    assert outcome.output_volume is not None and outcome.uncertainty_volume is None
    assert "No uncertainty map" in outcome.message and why in outcome.message
    assert os.listdir(fake_logic.temp_root) == []


def test_the_status_says_when_and_why_the_rician_bias_was_removed(mrml, fake_logic, tmp_path):
    """Read as magnitude data (auto), forced (remove) or not at all: the status line tells the three apart and the
    result carries the noise's sigma."""
    path = tmp_path / "head.nrrd"
    _noisy_volume(path)
    source = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    read = fake_logic.denoise(source, DenoiseSettings(mode="fast", model="magnitude"))
    assert "The volume reads as MR magnitude data: the bias its Rician noise (sigma 21.5 in its units)" in read.message
    assert read.output_volume.GetAttribute("DiffDenoise.RicianSigma") == "21.5"
    forced = fake_logic.denoise(source, DenoiseSettings(mode="fast", rician_bias="remove"))
    assert "As Rician bias 'remove' asked, the volume was taken as MR magnitude data" in forced.message
    assert "reads as MR magnitude" not in forced.message
    kept = fake_logic.denoise(source, DenoiseSettings(mode="fast", model="magnitude", rician_bias="keep"))
    assert "Rician" not in kept.message and kept.output_volume.GetAttribute("DiffDenoise.RicianSigma") is None


def _fast_outcomes(mrml, logic, tmp_path, model: str):
    """(Fast's outcome on a noisy head volume with the fake worker's `model`, and with its default model)."""
    path = tmp_path / "head.nrrd"
    _noisy_volume(path)
    source = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    return tuple(logic.denoise(source, DenoiseSettings(mode="fast", **chosen)) for chosen in ({"model": model}, {}))


def test_the_status_says_when_the_input_was_given_back_because_the_networks_took_anatomy(mrml, fake_logic, tmp_path):
    given, plain = _fast_outcomes(mrml, fake_logic, tmp_path, "anatomy")
    assert "what the networks removed followed the volume's edges (fine anatomy with the noise): 80% of the input " \
           "was given back" in given.message
    assert "given back" not in plain.message


def test_the_status_and_the_result_say_how_heavily_the_wiener_filter_weighed_the_noise(mrml, fake_logic, tmp_path):
    weighed, plain = _fast_outcomes(mrml, fake_logic, tmp_path, "weighed")
    assert "The Wiener filter weighed the noise 2.2 times, as recorrupted copies of the volume chose" in weighed.message
    assert weighed.output_volume.GetAttribute("DiffDenoise.WienerNoiseWeight") == "2.2"
    assert "weighed the noise" not in plain.message


def test_the_status_says_that_padding_outside_the_field_of_view_was_left_as_it_was(mrml, fake_logic, tmp_path):
    padded, plain = _fast_outcomes(mrml, fake_logic, tmp_path, "padded")
    assert "1,200 voxels of padding outside the field of view (the value -3024" in padded.message
    assert "left as they were" in padded.message
    assert "padding" not in plain.message


def test_a_model_that_separates_correlated_noise_poorly_is_followed_by_the_one_that_does(mrml, fake_logic,
                                                                                           tmp_path):
    """The worker's suggestion of a model made for correlated noise reaches the panel in its words, not the CLI's."""
    from DiffDenoiseLib.slicer_logic import suggestion_for_the_noise

    path = tmp_path / "head.nrrd"
    _noisy_volume(path)
    source = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    outcome = fake_logic.denoise(source, DenoiseSettings(mode="fast", model="one-pixel"))
    assert outcome.status == "done", outcome.message
    assert ("one-pixel blind spot separates poorly: the model 'correlated-noise-default' (choose it under Model)"
            in outcome.message) and "--model" not in outcome.message
    plain = fake_logic.denoise(source, DenoiseSettings(mode="fast"))
    assert "blind spot" not in plain.message
    faint = suggestion_for_the_noise({"model": "wide", "noise": "faint"})
    assert "is faint" in faint and "If it is noise, the model 'wide'" in faint and suggestion_for_the_noise(None) == ""


def test_result_fills_a_chosen_output_volume(mrml, fake_logic, tmp_path):
    path = tmp_path / "head.nii.gz"
    _noisy_volume(path)
    source = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    chosen = mrml["scene"].AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my result")
    outcome = fake_logic.denoise(source, DenoiseSettings(), output_node=chosen)
    assert outcome.output_volume is chosen and outcome.uncertainty_volume is None
    np.testing.assert_array_equal(_matrix(chosen), _matrix(source))


def test_refused_input_reports_the_worker_sentence_and_adds_nothing(mrml, fake_logic, tmp_path):
    path = tmp_path / "head.nrrd"
    _noisy_volume(path)
    source = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    volumes_before = mrml["scene"].GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    outcome = fake_logic.denoise(source, DenoiseSettings(model="missing"))
    assert outcome.status == "failed" and outcome.exit_code == 2
    assert "unknown model 'missing'" in outcome.message
    assert mrml["scene"].GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes_before
    assert os.listdir(fake_logic.temp_root) == []


def test_composite_nodes_and_blended_slice_follow_the_fade(mrml, fake_logic, tmp_path):
    path = tmp_path / "head.nrrd"
    _noisy_volume(path)
    source = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    output = fake_logic.denoise(source, DenoiseSettings()).output_volume
    red = mrml["slices"]["Red"]
    composite = red.GetSliceCompositeNode()
    assert composite.GetBackgroundVolumeID() == output.GetID()
    assert composite.GetForegroundVolumeID() == source.GetID()
    assert composite.GetForegroundOpacity() == 0.0  # the result is shown first
    red.FitSliceToAll()

    images = {}
    for fade in (0.0, 0.5, 1.0):
        fake_logic.set_fade(fade)
        assert composite.GetForegroundOpacity() == pytest.approx(1.0 - fade)
        images[fade] = _blended(red)
    assert np.abs(images[0.0] - images[1.0]).mean() > 1.0
    np.testing.assert_allclose(images[0.5], (images[0.0] + images[1.0]) / 2, atol=1.01)


def test_side_by_side_shows_original_and_result_in_linked_views(mrml, fake_logic, tmp_path):
    path = tmp_path / "head.nrrd"
    _noisy_volume(path)
    source = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    output = fake_logic.denoise(source, DenoiseSettings()).output_volume
    red_view, yellow_view = mrml["slices"]["Red"].GetSliceNode(), mrml["slices"]["Yellow"].GetSliceNode()
    yellow_view.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(
        np.array([[0, 0, 1, 5], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)))  # sagittal
    yellow_view.UpdateMatrices()

    fake_logic.show_side_by_side(source, output)

    assert mrml["layout"].GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    red = mrml["slices"]["Red"].GetSliceCompositeNode()
    yellow = mrml["slices"]["Yellow"].GetSliceCompositeNode()
    assert (red.GetBackgroundVolumeID(), red.GetForegroundVolumeID()) == (source.GetID(), None)
    assert (yellow.GetBackgroundVolumeID(), yellow.GetForegroundVolumeID()) == (output.GetID(), None)
    assert red.GetLinkedControl() and yellow.GetLinkedControl()
    np.testing.assert_array_equal(slicer.util.arrayFromVTKMatrix(yellow_view.GetSliceToRAS()),
                                  slicer.util.arrayFromVTKMatrix(red_view.GetSliceToRAS()))


def _centre_red_view_on(mrml, source, ijk):
    red = mrml["slices"]["Red"].GetSliceNode()
    centre = _matrix(source) @ np.append(np.asarray(ijk, float), 1.0)
    for row in range(3):
        red.GetSliceToRAS().SetElement(row, 3, centre[row])
    red.UpdateMatrices()


def test_preview_denoises_the_slice_in_the_red_view_and_puts_it_in_place(mrml, fake_logic, tmp_path):
    path = tmp_path / "head.nrrd"
    voxels = _noisy_volume(path)
    source = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    _centre_red_view_on(mrml, source, (3, 4, 2))
    assert fake_logic.slice_in_view(source) == ("z", 2)  # the coarsest spacing (2.5 mm) is across z

    outcome = fake_logic.preview_job(source, DenoiseSettings(mode="full")).start(wait_for_completion=True).outcome
    assert (outcome.kind, outcome.status) == ("preview", "done"), outcome.message
    assert "slice 2 (z axis) of head" in outcome.message
    preview = outcome.output_volume
    assert preview.GetName() == "head preview" and preview.GetImageData().GetDimensions() == (24, 20, 1)
    np.testing.assert_allclose(_matrix(preview) @ [5, 6, 0, 1], _matrix(source) @ [5, 6, 2, 1], atol=1e-9)
    assert fake_logic.source_volume(preview).GetID() == source.GetID()
    assert mrml["slices"]["Red"].GetSliceCompositeNode().GetBackgroundVolumeID() == preview.GetID()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(source), voxels)

    _centre_red_view_on(mrml, source, (7, 4, 2))
    again = fake_logic.preview_job(source, DenoiseSettings(slice_axis="x")).start(wait_for_completion=True).outcome
    assert again.output_volume.GetID() == preview.GetID(), "the next preview of the same input reuses its volume"
    assert preview.GetImageData().GetDimensions() == (1, 20, 6)
    np.testing.assert_allclose(_matrix(preview) @ [0, 6, 3, 1], _matrix(source) @ [7, 6, 3, 1], atol=1e-9)


def test_preview_needs_the_view_on_the_volume(mrml, fake_logic, tmp_path):
    path = tmp_path / "head.nrrd"
    _noisy_volume(path)
    source = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    _centre_red_view_on(mrml, source, (3, 4, 9))
    with pytest.raises(ValueError, match="Red view shows no slice of head across its z axis"):
        fake_logic.preview_job(source, DenoiseSettings())
    assert not list((tmp_path / "jobs").iterdir()), "nothing is written for a refused preview"
    assert mrml["scene"].GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1


def test_training_exports_every_chosen_volume(mrml, fake_logic, tmp_path):
    nodes = []
    for index in range(2):
        path = tmp_path / ("scan%d.nrrd" % index)
        _noisy_volume(path, shape=(4 + index, 16, 18))
        nodes.append(mrml["volumes"].AddArchetypeVolume(str(path), "scan%d" % index))
    job = fake_logic.training_job(nodes, TrainSettings(name="my-mri", max_steps=5))
    messages = []
    job.log.connect(messages.append)
    outcome = job.start(wait_for_completion=True).outcome
    assert outcome.status == "done" and outcome.model == "my-mri"
    assert [tuple(size) for size in outcome.result["inputs"]] == [(18, 16, 4), (18, 16, 5)]
    assert "training on 2 volumes" in messages
    with pytest.raises(ValueError):
        fake_logic.training_job(nodes, TrainSettings(name="  "))
    with pytest.raises(ValueError):
        fake_logic.training_job([], TrainSettings(name="x"))


def _volume_with_noise(name: str, shape, correlated: bool, seed: int = 0):
    """A scene volume of a bright box under white Gaussian noise, or under that noise blurred in-plane by a Gaussian
    of 1.2 pixels (spatially correlated)."""
    clean = np.zeros(shape)
    clean[:, shape[1] // 4:3 * shape[1] // 4, shape[2] // 4:3 * shape[2] // 4] = 0.5
    noisy = add_noise(clean, "correlated", 1.2, seed) if correlated else add_noise(clean, "gaussian", 0.1, seed)
    return slicer.util.addVolumeFromArray(noisy.astype(np.float32), name=name)


def _card(name: str, context: int = 0, radius: int = 0, fusion: bool = True) -> dict:
    return {"name": name, "source": "user", "architecture": {"context_slices": context, "blind_spot_radius": radius},
            "sampling": {"fusion": fusion}}


def _estimates(logic, volume, card: dict, mode: str = "fast"):
    """(the estimate with `card`'s model, the networks-only estimate: the same model without fusion and filters)."""
    return tuple(logic.estimate(volume, DenoiseSettings(mode=mode, model=card["name"], device="cpu"), [model])
                 for model in (card, dict(card, sampling={"fusion": False})))


def test_estimate_names_the_device_and_warns_about_full_on_cpu(mrml, fake_logic):
    volume = _volume_with_noise("ct", (200, 256, 256), correlated=False)
    fast = fake_logic.estimate(volume, DenoiseSettings(mode="fast", device="cpu"))
    # sampling long enough that Full takes more than twice Fast's time (the filters both run take most of Fast's)
    full = fake_logic.estimate(volume, DenoiseSettings(mode="full", device="cpu", steps=20, pairs=2))
    assert fast.device == full.device == "cpu" and "CPU" in full.device_message
    assert full.seconds > 2 * fast.seconds
    assert fast.advice == "" and "Fast mode" in full.advice
    one_slice = (full.seconds - 5.0) / 200 + 5.0  # the worker's start-up, then one of the 200 axial slices
    assert "Preview slice shows Full mode on one slice in about %d s" % round(one_slice) in full.advice


def test_the_preview_estimate_counts_the_neighbours_a_2_5d_model_runs_its_networks_on(mrml, fake_logic):
    """Under correlated noise a wide blind spot's 2.5D model's filters gather patches from 4 slices either way,
    whose Wiener groups feed the slice too and read 4 slices beyond them: one slice's preview costs the Wiener
    step 9 times and the networks 17 times."""
    from DiffDenoiseLib import worker_protocol
    from DiffDenoiseLib.slicer_logic import _CPU_SECONDS_PER_MEGAPIXEL, _NETWORK_STAGES, filter_reach, run_stages
    from DiffDenoiseLib.slicing import tiled_pixels

    assert [filter_reach(_card(name, context, radius), 128) for name, context, radius in (
        ("2d", 0, 3), ("one-pixel-2.5d", 2, 0), ("wide-2.5d", 2, 3))] == [(0, 0), (2, 2), (4, 8)]
    assert filter_reach(_card("unfused", 2, 3, fusion=False), 128) == (0, 0) == filter_reach(_card("w", 2, 3), 8)
    volume = _volume_with_noise("head", (40, 512, 512), correlated=True)
    # long sampling, so that Full takes more than twice Fast's time and the panel offers the preview
    card = dict(_card("wide-2.5d", context=2, radius=3), sampling={"fusion": True, "steps": 20, "pairs": 2})
    full = fake_logic.estimate(volume, DenoiseSettings(mode="full", model="wide-2.5d", device="cpu"), [card])
    stages = run_stages(card, "full", 0, 0, 40, 512, white=False, strong=True)
    assert "correlated_wiener_context" in stages
    one_slice = 5.0 + sum(passes * _CPU_SECONDS_PER_MEGAPIXEL[stage] * (
        17 * tiled_pixels(512, 512) / 1e6 if stage in _NETWORK_STAGES else
        9 * 512 * 512 / 1e6 if stage == "correlated_wiener_context" else 512 * 512 / 1e6)
        for stage, passes in stages.items())
    assert "Preview slice shows Full mode on one slice in about %s." % worker_protocol.format_seconds(one_slice) in (
        full.advice), full.advice


def test_estimate_of_a_white_noise_volume_for_a_2_5d_model_is_the_volumetric_filter(mrml, fake_logic):
    volume = _volume_with_noise("head", (12, 96, 96), correlated=False)
    filtered, networks = _estimates(fake_logic, volume, _card("ct-2.5d", context=2))
    assert "the volumetric filter makes the image" in filtered.advice and networks.advice == ""
    assert filtered.seconds - 5.0 > 3 * (networks.seconds - 5.0), "the filter costs far more than the student"
    full, _ = _estimates(fake_logic, volume, _card("ct-2.5d", context=2), mode="full")
    # the networks do not run in Full mode either; its Wiener groups are deeper (pipeline.deep_wiener_groups)
    assert full.seconds == pytest.approx(5.0 + 12 * 96 * 96 / 1e6 * _CPU_SECONDS_PER_MEGAPIXEL[
        "volumetric_filter_deep_groups"]) and full.seconds > 2 * filtered.seconds - 5.0


def test_estimate_of_strong_noise_that_reads_nearly_white_counts_the_volumetric_filter_reading_its_shape(mrml,
                                                                                                       fake_logic):
    """Noise of a 0.45-pixel kernel reads white by the binning ratio but has its shape read by the volumetric filter
    (pipeline.filters_read_the_noise_shape): that stage's cost, and advice that says why. Full counts the filter's
    deeper Wiener groups, which noise that reads white in the filter too gets (pipeline.deep_wiener_groups)."""
    clean = np.zeros((12, 96, 96))
    clean[:, 24:72, 24:72] = 0.5
    noisy = add_noise(clean, "correlated", 0.45, np.random.default_rng(2))
    volume = slicer.util.addVolumeFromArray(noisy.astype(np.float32), name="nearly white")
    card = _card("ct-2.5d", context=2)
    shaped, _ = _estimates(fake_logic, volume, card)
    full, _ = _estimates(fake_logic, volume, card, mode="full")
    for estimate, stage in ((shaped, "shaped_volumetric_filter"), (full, "shaped_volumetric_filter_deep_groups")):
        assert estimate.seconds == pytest.approx(5.0 + 12 * 96 * 96 / 1e6 * _CPU_SECONDS_PER_MEGAPIXEL[stage]
                                                 + _shape_read_seconds(12, 96))
        assert "The noise looks white, and strong enough to read how it spreads" in estimate.advice
    assert full.seconds - shaped.seconds > 12 * 96 * 96 / 1e6 * _CPU_SECONDS_PER_MEGAPIXEL["shaped_volumetric_filter"]


def _shape_read_seconds(slices: int, side: int) -> float:
    """The estimate's seconds for reading the noise's shape on a volume: per step of the read and megapixel of one
    slice, over the read's steps."""
    from DiffDenoiseLib.wiener import shape_read_steps

    return shape_read_steps(slices, range(slices)) * side * side / 1e6 * _CPU_SECONDS_PER_MEGAPIXEL["noise_shape_read"]


def test_the_estimate_counts_reading_the_noise_shape_once_a_scan(mrml):
    """The volumetric filter reads the noise's shape on at most 16 slices (wiener.shape_read_steps): its cost stops
    growing with the scan from 24 slices on, while the filter's grows with every slice."""
    from DiffDenoiseLib.slicer_logic import run_stages

    card = _card("ct-2.5d", context=2)
    for mode, stage in (("fast", "shaped_volumetric_filter"), ("full", "shaped_volumetric_filter_deep_groups")):
        short, long = (run_stages(card, mode, 0, 0, n, 256, white=True, strong=True, noise_shape=True)
                       for n in (24, 240))
        assert short[stage] == long[stage] == 1 and set(short) == {stage, "noise_shape_read"}
        assert short["noise_shape_read"] * 24 == long["noise_shape_read"] * 240 > 0
    mild = run_stages(card, "full", 0, 0, 240, 256, white=False, strong=True, noise_shape=True)
    assert set(mild) == {"correlated_volumetric_filter", "noise_shape_read"}


def test_estimate_of_faint_mildly_correlated_noise_counts_the_volumetric_filter_reading_its_shape(mrml, fake_logic):
    """Faint noise of a 0.5-pixel kernel (a sharp reconstruction kernel's) sends a one-pixel 2.5D model's volume to
    the volumetric filter, which reads its shape (pipeline.volumetric_filter_makes_the_image): that stage's cost, and
    advice that says why."""
    zz, yy, xx = np.mgrid[0:12, 0:48, 0:48]
    clean = 1000.0 + 400.0 * ((yy - 24) ** 2 + (xx - 22) ** 2 < 150 + 10 * zz) + 2.0 * xx
    noisy = clean + add_noise(np.zeros(clean.shape), "correlated", 0.5, np.random.default_rng(9), sigma=5.0)
    volume = slicer.util.addVolumeFromArray(noisy.astype(np.float32), name="faint")
    shaped, networks = _estimates(fake_logic, volume, _card("ct-2.5d", context=2))
    assert shaped.seconds == pytest.approx(5.0 + 12 * 48 * 48 / 1e6 * _CPU_SECONDS_PER_MEGAPIXEL[
        "correlated_volumetric_filter"] + _shape_read_seconds(12, 48))
    assert "The noise is faint and looks mildly correlated" in shaped.advice and networks.advice == ""


def test_run_stages_of_a_2d_model_count_its_filters_reading_the_noise_shape():
    from DiffDenoiseLib.slicer_logic import run_stages

    card = _card("2d")
    shaped = run_stages(card, "fast", 0, 0, 1, 128, white=True, strong=True, noise_shape=True)
    assert shaped == {"student": 2, "filters_2d": 1, "noise_shape_read_2d": 4}  # 4 rounds on the one slice
    assert "noise_shape_read_2d" not in run_stages(card, "fast", 0, 0, 1, 128, white=True, strong=True)
    # down to one window of the covariance's read (pipeline.filters_2d_read_the_noise_shape)
    assert "noise_shape_read_2d" in run_stages(card, "fast", 0, 0, 1, 32, white=True, strong=True, noise_shape=True)
    assert "noise_shape_read_2d" not in run_stages(card, "fast", 0, 0, 1, 24, white=True, strong=True,
                                                   noise_shape=True)
    # the read covers 16 slices at most (wiener.noise_shape_steps): on a long stack it is counted once
    stack = run_stages(card, "fast", 0, 0, 160, 128, white=True, strong=True, noise_shape=True)
    assert stack["noise_shape_read_2d"] * 160 == 4 * 16 and stack["filters_2d"] == 1
    # Full's Wiener groups are deeper (pipeline.deep_wiener_groups), a stage of their own
    full = run_stages(card, "full", 0, 0, 1, 128, white=True, strong=True, noise_shape=True)
    assert full["filters_2d_deep_groups"] == 1 and full["noise_shape_read_2d"] == 4 and "filters_2d" not in full


def test_run_stages_of_a_2d_model_under_white_noise_count_choosing_the_noises_weight_once_an_image():
    """The weight is chosen on two probes of up to four 128x128 crops of the middle slice (noise_weight.py), however
    many slices: on a 128x128 slice both probes cover it, on 160 slices of 512x512 a quarter of one slice each."""
    from DiffDenoiseLib.slicer_logic import run_stages

    card = _card("2d")
    assert run_stages(card, "fast", 0, 0, 1, 128, white=True, strong=True) == {
        "student": 2, "filters_2d": 1, "noise_weight_2d": 2}
    stack = run_stages(card, "full", 0, 0, 160, 512, white=True, strong=True)
    assert stack["noise_weight_2d_deep_groups"] * 160 == pytest.approx(2 * 0.25) and "noise_weight_2d" not in stack
    assert "noise_weight_2d" not in run_stages(card, "fast", 0, 0, 1, 128, white=False, strong=True)
    assert "noise_weight_2d" not in run_stages(_card("ct-2.5d", context=2), "fast", 0, 0, 3, 128, white=True,
                                               strong=True)


def test_estimate_under_correlated_noise_with_a_one_pixel_2_5d_model_is_the_volumetric_filter_alone(mrml, fake_logic):
    """Strong noise that is not white: the volumetric filter with exact variances makes the image in both modes;
    faint such noise (texture under noise of 2 units in 1500): the networks, and in Fast the student's second pass
    for the share of the input given back where they took anatomy."""
    volume = _volume_with_noise("head", (12, 96, 96), correlated=True)
    filters = 5.0 + 12 * 96 * 96 / 1e6 * _CPU_SECONDS_PER_MEGAPIXEL["correlated_volumetric_filter"] + (
        _shape_read_seconds(12, 96))
    for mode in ("fast", "full"):
        one_pixel, networks = _estimates(fake_logic, volume, _card("one-pixel", context=2), mode)
        assert one_pixel.seconds == pytest.approx(filters) and "mildly correlated" in one_pixel.advice, mode
    yy, xx = np.mgrid[0:64, 0:64]
    rng = np.random.default_rng(1)
    texture = np.stack([1500.0 + 10.0 * xx + 800.0 * ((yy - 32) ** 2 / 300 + (xx - 32) ** 2 / 150 < 1)
                        + 60.0 * np.sin(xx / 1.5) * np.cos(yy / 2.0) + rng.normal(0, 2.0, (64, 64)) for _ in range(8)])
    faint = slicer.util.addVolumeFromArray(texture.astype(np.float32), name="texture")
    one_pixel, networks = _estimates(fake_logic, faint, _card("one-pixel", context=2))
    probe = 8 * 64 * 64 / 1e6 * _CPU_SECONDS_PER_MEGAPIXEL["student"]
    assert one_pixel.seconds == pytest.approx(networks.seconds + probe) and one_pixel.advice == ""


def test_estimate_of_a_2d_model_counts_the_exact_filters_under_strong_correlated_noise_only(mrml, fake_logic):
    """Strong correlated noise: the filters run after a 2D model of any blind spot; faint noise that does not look
    white (texture under noise of 2 units in 1500): the networks, and in Fast the student's second pass for the
    share of the input given back where they took anatomy."""
    strong = _volume_with_noise("x-ray", (1, 128, 128), correlated=True)
    one_pixel, networks = _estimates(fake_logic, strong, _card("one-pixel"))
    filters = 128 * 128 / 1e6 * _CPU_SECONDS_PER_MEGAPIXEL["correlated_filters_2d"]
    assert one_pixel.seconds - networks.seconds == pytest.approx(filters) and "spatially correlated" in one_pixel.advice
    yy, xx = np.mgrid[0:64, 0:64]
    texture = (1500.0 + 10.0 * xx + 800.0 * ((yy - 32) ** 2 / 300 + (xx - 32) ** 2 / 150 < 1)
               + 60.0 * np.sin(xx / 1.5) * np.cos(yy / 2.0) + np.random.default_rng(1).normal(0, 2.0, (64, 64)))
    faint = slicer.util.addVolumeFromArray(texture[None].astype(np.float32), name="texture")
    one_pixel, networks = _estimates(fake_logic, faint, _card("one-pixel"))
    probe = 64 * 64 / 1e6 * _CPU_SECONDS_PER_MEGAPIXEL["student"]
    assert one_pixel.seconds == pytest.approx(networks.seconds + probe) and one_pixel.advice == ""


def test_estimate_of_a_single_image_does_not_offer_a_preview_of_one_slice(mrml, fake_logic):
    image = _volume_with_noise("x-ray", (1, 2048, 2048), correlated=False)
    full = fake_logic.estimate(image, DenoiseSettings(mode="full", model="2d", device="cpu"), [_card("2d")])
    assert "Full mode on the CPU is slow" in full.advice and "Preview slice" not in full.advice


def test_estimate_of_a_2d_image_under_correlated_noise_with_a_wide_blind_spot_counts_the_exact_filters(
        mrml, fake_logic):
    image = _volume_with_noise("x-ray", (1, 128, 128), correlated=True)
    wide, networks = _estimates(fake_logic, image, _card("wide", radius=3))
    filters = 128 * 128 / 1e6 * _CPU_SECONDS_PER_MEGAPIXEL["correlated_filters_2d"]
    assert wide.seconds - networks.seconds == pytest.approx(filters)
    assert "spatially correlated" in wide.advice and networks.advice == ""


def test_estimate_of_fast_on_a_volume_under_correlated_noise_counts_the_blind_spot_that_matches_the_groups(
        mrml, fake_logic):
    volume = _volume_with_noise("head", (12, 96, 96), correlated=True)
    card = dict(_card("wide-2.5d", context=2, radius=3), sampling={"fusion": True, "self_ensemble": 1})
    wide, networks = _estimates(fake_logic, volume, card)
    per_pass = 12 * 96 * 96 / 1e6
    seconds = _CPU_SECONDS_PER_MEGAPIXEL
    added = per_pass * (seconds["correlated_wiener_context"] + seconds["bsn_wide"])
    assert wide.seconds - networks.seconds == pytest.approx(added)


def test_automatic_estimate_follows_the_shipped_default_the_worker_picks(mrml, fake_logic, tmp_path):
    shipped = [card for card in ModelStore(store_dir=tmp_path).list() if "error" not in card]
    for name, shape, correlated, default, says in (
            ("head", (12, 96, 96), False, "mr-brain-2.5d", "volumetric filter"),
            ("slice", (1, 96, 96), False, "mr-brain-default", ""),
            ("blurred", (12, 96, 96), True, "correlated-noise-2.5d", "spatially correlated")):
        volume = _volume_with_noise(name, shape, correlated)
        automatic, chosen = (fake_logic.estimate(volume, DenoiseSettings(mode="full", model=model, device="cpu"),
                                                 shipped) for model in ("", default))
        assert (automatic.seconds, automatic.advice) == (chosen.seconds, chosen.advice), default
        assert says in automatic.advice


def test_estimate_reads_the_noise_once_per_version_of_the_voxels(mrml, fake_logic, monkeypatch, tmp_path):
    """The automatic choice of the model and the white-noise test share one reading of an axial volume."""
    from DiffDenoiseLib import noise

    shapes = []
    reading = noise.binning_noise_reading
    monkeypatch.setattr(noise, "binning_noise_reading", lambda a: shapes.append(a.shape) or reading(a))
    volume = _volume_with_noise("head", (40, 64, 64), correlated=False)
    shipped = [card for card in ModelStore(store_dir=tmp_path).list() if "error" not in card]
    for mode, device in (("fast", "cpu"), ("full", "cpu"), ("full", "auto")):
        white = fake_logic.estimate(volume, DenoiseSettings(mode=mode, device=device), shipped)
    assert shapes == [(32, 64, 64)], "read once, on the slices the pipeline's reading samples"
    slicer.util.updateVolumeFromArray(volume, add_noise(np.zeros((40, 64, 64)), "correlated", 1.2, 1)
                                      .astype(np.float32))
    blurred = fake_logic.estimate(volume, DenoiseSettings(mode="full", device="auto"), shipped)
    assert len(shapes) == 2 and "volumetric filter" in white.advice and "volumetric filter" not in blurred.advice
    assert "spatially correlated" in blurred.advice
    sagittal = fake_logic.estimate(volume, DenoiseSettings(mode="full", slice_axis="x", device="auto"), shipped)
    assert len(shapes) == 3 and shapes[-1] == (32, 40, 64), "another slicing is read on its own slices"
    assert "spatially correlated" in sagittal.advice


def test_estimate_of_a_volume_with_nan_voxels_says_so(mrml, fake_logic, tmp_path):
    shipped = [card for card in ModelStore(store_dir=tmp_path).list() if "error" not in card]
    voxels = add_noise(np.zeros((12, 96, 96)), "gaussian", 0.1, 2).astype(np.float32)
    voxels[3, 10:20, 10:20] = np.nan
    volume = slicer.util.addVolumeFromArray(voxels, name="damaged")
    for model, cards in (("", shipped), ("ct-2.5d", [_card("ct-2.5d", context=2)])):
        with pytest.raises(ValueError, match="NaN or infinite voxels"):
            fake_logic.estimate(volume, DenoiseSettings(mode="fast", model=model, device="cpu"), cards)


def test_real_worker_trains_on_scene_volumes_then_denoises_with_the_new_model(mrml, tmp_path):
    """The real command line end to end: `train --max-steps 5` on a scene volume, then Fast and Full."""
    from DiffDenoiseLib.slicer_logic import worker_environment

    env = worker_environment()
    env["DIFFDENOISE_MODELS"] = str(tmp_path / "models")
    env["OMP_NUM_THREADS"] = "1"
    logic = DenoiseLogic(scene=mrml["scene"], env=env, temp_root=str(tmp_path))
    path = tmp_path / "head.nrrd"
    _noisy_volume(path, shape=(5, 40, 36))
    source = mrml["volumes"].AddArchetypeVolume(str(path), "head")
    before = slicer.util.arrayFromVolume(source).copy()

    trained = logic.train([source], TrainSettings(name="tiny-test", max_steps=5, device="cpu"))
    assert trained.status == "done", trained.message
    assert trained.model == "tiny-test"
    assert "tiny-test" in [card["name"] for card in logic.list_models()]

    for mode in ("fast", "full"):
        outcome = logic.denoise(source, DenoiseSettings(mode=mode, model="tiny-test", device="cpu", steps=2,
                                                        uncertainty=True))
        assert outcome.status == "done", outcome.message
        assert outcome.result["mode"] == mode and outcome.model == "tiny-test"
        output = outcome.output_volume
        np.testing.assert_array_equal(_matrix(output), _matrix(source))
        assert slicer.util.arrayFromVolume(output).shape == before.shape
        assert np.isfinite(slicer.util.arrayFromVolume(output)).all()
        assert (outcome.uncertainty_volume is not None) == (mode == "full")
    fast = slicer.util.arrayFromVolume(logic.denoise(source, DenoiseSettings(model="tiny-test")).output_volume)
    _centre_red_view_on(mrml, source, (10, 12, 3))
    job = logic.preview_job(source, DenoiseSettings(model="tiny-test", device="cpu"))
    preview = job.start(wait_for_completion=True).outcome
    assert preview.status == "done", preview.message
    # Fast's share is read on the preview's slices alone, and the Wiener step sizes its groups on the pilot it moves,
    # so a few voxels differ, by about a thousandth of the noise's std of 10 (0.009 measured)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(preview.output_volume)[0], fast[3], rtol=1e-5, atol=0.05)
    np.testing.assert_allclose(_matrix(preview.output_volume) @ [1, 2, 0, 1], _matrix(source) @ [1, 2, 3, 1])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(source), before)
    assert sorted(os.listdir(tmp_path)) == ["head.nrrd", "models"]  # every job's temporary folder is gone
