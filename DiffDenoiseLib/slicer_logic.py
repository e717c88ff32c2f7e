"""MRML-facing logic of the DiffDenoise module: scene volumes in, background jobs, results in the scene.

`slicer` (and `qt`, for the GUI timer) are imported inside functions, never at
module level, so this file imports anywhere. It runs on the real MRML libraries
both inside Slicer and, for tests and scripts, with the `slicer-core` wheel.

A job writes its volumes to a temporary folder, runs the command-line worker
(`python -m DiffDenoiseLib ... --json`) as a `WorkerProcess` and turns the
outcome into scene changes; the temporary folder is removed whatever the outcome.
The input volume is only read, never modified.
"""

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from DiffDenoiseLib import worker_protocol
from DiffDenoiseLib.process import WorkerProcess
from DiffDenoiseLib.signals import Signal

LIBRARY_PARENT = str(Path(__file__).resolve().parent.parent)

# Seconds per megapixel of each stage a run can take, on a CPU of two cores: benchmarks/stage_costs.py measured them
# on 256x256 slices (benchmarks/results/stage_costs.json; the keys are its stages). The networks' figures are per
# megapixel they evaluate: a larger slice goes through them in overlapping tiles of that size (slicing.tiled_pixels).
# A GPU is counted _GPU_SPEED_UP times faster, the filters too (they run in torch there). Only the estimate shown
# before a run uses these; the time left while it runs comes from the worker. The filters' figures were scaled twice on
# 2026-12-08 by how much faster the filters became, each time by stage_costs on the code before and after, in turn on
# one machine: first (the Wiener steps on the groups' axes reading only the variances they use, block matching on
# strided views; 256x256 slices) 0.53 (the 2D deep groups) to 0.89 times the earlier time, then (block matching by
# matrix products, group_variance by embedding_bag; the mean of the ratios at 128 and 256) 0.46 to 0.85.
_CPU_SECONDS_PER_MEGAPIXEL = {
    "student": 2.9,
    "bsn": 4.6,
    "bsn_wide": 27.5,
    "diffusion": 3.3,
    # the volumetric filter's Wiener step on each group's own axes (2026-12-07) took 1.15 (Fast) and 1.28 times (the
    # deep groups) the time of the DCT's on 256x256 slices (stage_costs.measure, both alternately, twice each, on a
    # machine then 1.5 times slower than for the other figures), so those figures are the earlier ones times that
    "volumetric_filter": 13.2,  # Fast's; the other modes' Wiener groups are as deep as their similar cubes allow
    "volumetric_filter_deep_groups": 48.4,
    # reading the noise's shape: per step of the read (wiener.shape_read_steps, 40 from 24 slices on, however long the
    # scan) and megapixel of one slice; then the filter after it, under noise that reads correlated in it (any mode)
    # or white (as strong white noise with a binning ratio above 1.3 has it; Fast, and Full's deeper groups). Against
    # whole scans of the InVesalius CT (256x256, AMD EPYC, 2026-12-07) under Gaussian 25/255: 108 slices Fast 235 s
    # counted against 259 taken, Full 551 against 552, 24 slices 98 against 100 and 168 against 148; 48 slices under
    # noise of a 0.5-pixel kernel (std 0.05) Fast 227 against 219 (one figure per megapixel had counted 208, 518, 46,
    # 115 and 93)
    "noise_shape_read": 9.5,
    "correlated_volumetric_filter": 30.5,
    "shaped_volumetric_filter": 15.8,  # noise that reads white in it: the Wiener step on the groups' axes too
    "shaped_volumetric_filter_deep_groups": 45.0,
    # a lone slice's Wiener step on each group's own axes (2026-12-07): both steps took 1.33 (Fast) and 1.13 times (the
    # deep groups) their earlier time on 256x256 slices (measured as the volumetric filter's, above), so the figures
    # are the earlier ones times that
    "filters_2d": 14.7,  # Fast's; the other modes' Wiener groups are as deep as their similar patches allow
    "filters_2d_deep_groups": 25.6,
    "noise_shape_read_2d": 3.5,  # per step of the read (wiener.noise_shape_steps), as the volumetric one
    # choosing the noise's weight of a 2D image's Wiener step (noise_weight.py): per probe and megapixel of its crops
    # (the first step and the Wiener step trying every weight on one matching; the network's run on the crops is
    # small beside them). stage_costs at 128x128 and 256x256 (AMD EPYC, 2026-12-07) measured 31.2 (Fast) and 91.6
    # against 32.4 and 95.4 for `filters_2d` and its deep groups in the same run: the figures are those above times
    # those ratios
    "noise_weight_2d": 13.9,
    "noise_weight_2d_deep_groups": 29.9,
    "wiener_context": 5.5,
    "correlated_filters_2d": 231.4,
    "correlated_wiener_context": 45.9,
}
_NETWORK_STAGES = ("student", "bsn", "bsn_wide", "diffusion")
_SHAPE_READING_STAGES = {"correlated_volumetric_filter", "shaped_volumetric_filter",
                         "shaped_volumetric_filter_deep_groups"}
_GPU_SPEED_UP = 30.0
_STARTUP_SECONDS = 5.0
NOISE_READING_SLICES = 32  # the evenly spaced slices noise.binning_noise_reading reads: the estimate reads the same
SOURCE_REFERENCE = "DiffDenoiseSource"  # node reference from a result to the volume it was computed from
PREVIEW_OF = "DiffDenoise.PreviewOf"  # attribute of a one-slice preview volume: the ID of its input
IJK_AXIS = {"x": 0, "y": 1, "z": 2}  # voxel axis names as the worker's --slice-axis takes them


@dataclass
class DenoiseSettings:
    """What the Denoise button runs; 0 steps/pairs keeps the model's own sampling settings."""

    mode: str = "fast"
    model: str = ""
    device: str = "auto"
    steps: int = 0
    pairs: int = 0
    uncertainty: bool = False
    slice_axis: str = "auto"  # auto | z | y | x (voxel axes)
    rician_bias: str = "auto"  # auto | remove | keep: the Rician bias of MR magnitude data (magnitude.py)


@dataclass
class TrainSettings:
    name: str
    stages: Tuple[str, ...] = ("bsn", "diffusion", "student")
    from_model: str = ""
    max_steps: int = 0
    device: str = "auto"
    noise: str = "gaussian"  # gaussian | poisson | gamma | rician: chooses the variance-stabilising transform
    context_slices: int = 0  # neighbouring slices on each side (2.5D)
    blind_spot_radius: int = 0  # > 0 for spatially correlated noise


@dataclass
class Estimate:
    device: str          # "cpu", "cuda", "mps"
    device_message: str  # the library's sentence about the device
    seconds: float
    advice: str          # "" or sentences: Fast over a slow Full on a CPU, which filters take most of the time


@dataclass
class JobOutcome:
    """How a job ended: `status` is "done", "cancelled" or "failed"."""

    kind: str
    status: str
    message: str
    exit_code: int
    result: dict = field(default_factory=dict)
    output_volume: object = None
    uncertainty_volume: object = None
    model: str = ""


def qt_poll_timer(poll: Callable[[], bool], interval_ms: int = 100):
    """Call `poll` from Slicer's event loop until it returns False; returns the timer (keep a reference)."""
    import qt

    timer = qt.QTimer()
    timer.setInterval(interval_ms)

    def tick():
        if not poll():
            timer.stop()

    timer.timeout.connect(tick)
    timer.start()
    return timer


class Job:
    """One background run: a worker, the temporary folder it reads and writes, and what to do on success.

    Signals: `progress(event)` for progress events, `log(message)` for every line a
    person may want to read, `finished(JobOutcome)` once.
    """

    def __init__(self, kind: str, worker: WorkerProcess, temp_dir: str,
                 on_success: Callable[[dict], JobOutcome], timer_factory: Callable = qt_poll_timer):
        self.kind = kind
        self._timer_factory = timer_factory
        self.worker = worker
        self.temp_dir = temp_dir
        self._on_success = on_success
        self.progress = Signal("event")
        self.log = Signal("message")
        self.finished = Signal("outcome")
        self.outcome: Optional[JobOutcome] = None
        self._result: dict = {}
        self._error = ""
        self._timer = None
        worker.event.connect(self._on_event)
        worker.finished.connect(self._on_finished)

    @property
    def running(self) -> bool:
        return self.outcome is None

    def start(self, wait_for_completion: bool = False) -> "Job":
        """Start the worker; with `wait_for_completion` return only when `finished` has been emitted."""
        try:
            self.worker.start()
        except OSError as error:
            self._finish(JobOutcome(self.kind, "failed", "Could not start the worker: %s" % error, -1))
            return self
        if wait_for_completion:
            self.worker.wait()
        else:
            self._timer = self._timer_factory(self.worker.poll)
        return self

    def cancel(self) -> None:
        if self.running:
            self.log.emit("Cancelling...")
            self.worker.cancel()

    def _on_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            self.progress.emit(event)
        elif kind == "result":
            self._result = event
        elif kind == "error":
            self._error = str(event.get("message", ""))
            self.log.emit("Error: " + self._error)
        elif kind == "checkpoint":
            self.log.emit("Checkpoint saved (%s, step %s)." % (event.get("stage", "?"), event.get("step", "?")))
        elif kind == "log" and event.get("message"):
            self.log.emit(str(event["message"]))

    def _on_finished(self, code: int) -> None:
        try:
            if code == worker_protocol.EXIT_OK:
                outcome = self._on_success(self._result)
            elif code == worker_protocol.EXIT_CANCELLED:
                outcome = JobOutcome(self.kind, "cancelled", "Cancelled.", code)
            else:
                reason = self._error or (self.worker.stderr_tail[-1] if self.worker.stderr_tail else "")
                message = "The worker %s%s" % (worker_protocol.describe_exit(code), ": " + reason if reason else ".")
                outcome = JobOutcome(self.kind, "failed", message, code)
        except Exception as error:  # reading the results failed: report it like a failed run
            outcome = JobOutcome(self.kind, "failed", "Could not import the results: %s" % error, code)
        self._finish(outcome)

    def _finish(self, outcome: JobOutcome) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.outcome = outcome
        self.log.emit(outcome.message)
        self.finished.emit(outcome)


def _check_denoise_request(input_node, settings: DenoiseSettings) -> None:
    if input_node is None or input_node.GetImageData() is None:
        raise ValueError("Select an input volume with image data.")
    if settings.mode not in ("fast", "full"):
        raise ValueError("unknown mode %r: use fast or full" % settings.mode)


class DenoiseLogic:
    """Denoise and train on scene volumes through the worker; show results for comparison.

    Collaborators can be passed in (tests, scripts): `scene` (default
    `slicer.mrmlScene`), `python` (the interpreter command for the worker),
    `env`, `temp_root` and `timer_factory` (how a running job is polled).
    """

    def __init__(self, scene=None, python: Optional[Sequence[str]] = None, env: Optional[Dict[str, str]] = None,
                 temp_root: Optional[str] = None, timer_factory: Callable = qt_poll_timer):
        self._scene = scene
        self.python = list(python) if python else default_python()
        self.env = env if env is not None else worker_environment()
        self.temp_root = temp_root
        self.timer_factory = timer_factory
        self._readings: Dict[str, tuple] = {}  # node ID: (version of its voxels, {what: reading}), see `_reading`

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    # ---- models and estimates -------------------------------------------------------

    def list_models(self) -> List[dict]:
        """The shipped and user models with their cards, as the worker's `models --json` lists them."""
        worker = WorkerProcess(worker_protocol.models_command(self.python), env=self.env)
        events: List[dict] = []
        worker.event.connect(events.append)
        code = worker.start().wait()
        if code != worker_protocol.EXIT_OK:
            raise RuntimeError("listing models failed: %s" % "\n".join(worker.stderr_tail))
        models: List[dict] = []
        for event in events:
            if isinstance(event.get("models"), list):
                models.extend(event["models"])
            elif event.get("event") == "model":
                models.append(event)
        return models

    def estimate(self, input_node, settings: DenoiseSettings, models: Sequence[dict] = ()) -> Estimate:
        """Which device will run and roughly how long Denoise takes on `input_node`: the stages the worker will
        run (`run_stages`) for the model it will use, among the cards in `models` (as `list_models` gives them;
        none known: a 2D model's defaults), and the noise the volume shows."""
        from DiffDenoiseLib.device import select_device
        from DiffDenoiseLib.noise import MIN_SIDE_TO_JUDGE_NOISE, reading_is_strong
        from DiffDenoiseLib.pipeline import filters_read_the_noise_shape
        from DiffDenoiseLib.slicing import tiled_pixels

        device, message = select_device(settings.device)
        dims = input_node.GetImageData().GetDimensions()
        axis = slice_axis_name(input_node, settings.slice_axis)
        slices = dims[IJK_AXIS[axis]]
        height, width = (size for index, size in enumerate(dims) if index != IJK_AXIS[axis])
        side = min(height, width)
        card = self._model_card(input_node, settings, models, slices)
        white = side >= MIN_SIDE_TO_JUDGE_NOISE and self._noise_looks_white(
            input_node, axis, card.get("transform", {"name": "none"}))
        reading = self._binning_reading(input_node, 2 - IJK_AXIS[axis]) if side >= MIN_SIDE_TO_JUDGE_NOISE else None
        strong = reading is not None and reading_is_strong(reading)
        shape = reading is not None and filters_read_the_noise_shape(reading)
        megapixels = slices * height * width / 1e6
        network_megapixels = slices * tiled_pixels(height, width) / 1e6  # the tiles of a large slice overlap
        speed_up = 1.0 if device.type == "cpu" else _GPU_SPEED_UP

        def seconds(stages: Dict[str, float]) -> float:
            return _STARTUP_SECONDS + sum(passes * _CPU_SECONDS_PER_MEGAPIXEL[stage]
                                          * (network_megapixels if stage in _NETWORK_STAGES else megapixels)
                                          for stage, passes in stages.items()) / speed_up

        stages = run_stages(card, settings.mode, settings.steps, settings.pairs, slices, side, white, strong, shape)
        total = seconds(stages)
        fast = seconds(run_stages(card, "fast", 0, 0, slices, side, white, strong, shape))
        advice = []
        if "volumetric_filter" in stages or "volumetric_filter_deep_groups" in stages:
            advice.append("The noise looks white: the volumetric filter makes the image, not the networks (Full "
                          "pools deeper groups of similar cubes than Fast, for three to four times its time).")
        shaped = bool(stages.keys() & _SHAPE_READING_STAGES)
        if shaped and white:
            advice.append("The noise looks white, and strong enough to read how it spreads between neighbouring "
                          "voxels, which the volumetric filter takes in: it makes the image (in Fast and Full, which "
                          "pools deeper groups of similar cubes), not the networks.")
        elif shaped and not strong:
            advice.append("The noise is faint and looks mildly correlated (a sharp reconstruction kernel's): the "
                          "volumetric filter makes the image (in Fast and Full), not the networks, which would "
                          "smooth fine anatomy away with it.")
        elif shaped:
            advice.append("The noise looks mildly correlated: the volumetric filter makes the image (in Fast and "
                          "Full), not the networks, whose one-pixel blind spot would pass such noise.")
        correlated = {stage: passes for stage, passes in stages.items()
                      if stage.startswith("correlated_") and stage not in _SHAPE_READING_STAGES}
        if correlated:
            filters = seconds(correlated) - _STARTUP_SECONDS
            advice.append("The noise looks spatially correlated: block-matching filters with its exact variances "
                          "take about %s of it." % worker_protocol.format_seconds(filters))
        if settings.mode == "full" and device.type == "cpu" and total > 120 and fast < total / 2:
            # under correlated noise the Wiener groups of the neighbours a 2.5D model's filters gather patches from
            # feed the slice too (wiener.spreads), and the networks run on every slice those groups read
            filtered, read = (min(slices, 1 + 2 * reach) for reach in filter_reach(card, side))
            # the noise's shape is read on as many slices around one as on the whole scan (wiener.shape_read_steps)
            on_neighbours = {**{stage: read for stage in _NETWORK_STAGES}, "correlated_wiener_context": filtered,
                             "noise_shape_read": slices}
            one_slice = seconds({stage: passes * on_neighbours.get(stage, 1) / slices
                                 for stage, passes in stages.items()})
            text = "Full mode on the CPU is slow (about %s for this volume); Fast mode takes about %s" % tuple(
                worker_protocol.format_seconds(t) for t in (total, fast))
            if slices > 1:  # a single image is its own preview
                text += ", and Preview slice shows Full mode on one slice in about %s" % (
                    worker_protocol.format_seconds(one_slice))
            advice.insert(0, text + ".")
        return Estimate(device.type, message, total, " ".join(advice))

    def _model_card(self, input_node, settings: DenoiseSettings, models: Sequence[dict], slices: int) -> dict:
        """The card, among `models`, of the model the worker will run on `input_node`: the one named in `settings`,
        or the shipped default it picks for the volume's modality, `slices` and noise (as `cli.py` does); {} when
        `models` does not hold it."""
        from DiffDenoiseLib.store import default_model

        name = settings.model
        if not name:
            from DiffDenoiseLib.imageio import modality_from_voxels
            from DiffDenoiseLib.noise import reading_looks_correlated

            modality = self._reading(input_node, "modality", lambda: modality_from_voxels(volume_array(input_node)))
            correlated = reading_looks_correlated(self._binning_reading(input_node, 0))  # as the worker reads its file
            try:
                name = default_model([card for card in models if card.get("source") == "shipped"], modality,
                                     slices, correlated)
            except ValueError:  # no shipped default: the worker will say so
                return {}
        # a user model of a shipped model's name takes its place, as ModelStore.resolve has it
        return next((card for card in sorted(models, key=lambda card: card.get("source") != "user")
                     if card.get("name") == name), {})

    def _noise_looks_white(self, input_node, axis: str, transform: dict) -> bool:
        """Whether the pipeline will find `input_node`'s noise white (`fusion.noise_is_white_enough_for_the_share`
        on the slices across `axis`, normalised and transformed as the networks get them)."""
        from DiffDenoiseLib.fusion import noise_is_white_enough_for_the_share, reading_is_white_enough_for_the_share
        from DiffDenoiseLib.noise import sample_slices
        from DiffDenoiseLib.pipeline import prepare_array
        from DiffDenoiseLib.slicing import as_slice_stack

        numpy_axis = 2 - IJK_AXIS[axis]
        if transform.get("name", "none") == "none":  # normalised linearly, which leaves the reading as it is
            return reading_is_white_enough_for_the_share(self._binning_reading(input_node, numpy_axis))

        def read() -> bool:
            stack = as_slice_stack(volume_array(input_node), numpy_axis)
            return noise_is_white_enough_for_the_share(
                prepare_array(sample_slices(stack, NOISE_READING_SLICES), transform).z)

        return self._reading(input_node, ("white noise", axis, tuple(sorted(transform.items()))), read)

    def _binning_reading(self, input_node, numpy_axis: int) -> Tuple[float, float]:
        """`noise.binning_noise_reading` of `input_node`'s voxels as they are, sliced across `numpy_axis`. A linear
        rescaling leaves it as it is, so the default model's choice (across axis 0, as the worker reads its file)
        and the white-noise test of the normalised slices share it where they slice alike: one reading of a
        300 x 512 x 512 CT (several seconds on the GUI thread) instead of two."""
        from DiffDenoiseLib.noise import binning_noise_reading, sample_slices
        from DiffDenoiseLib.slicing import as_slice_stack

        return self._reading(input_node, ("binning", numpy_axis), lambda: binning_noise_reading(
            sample_slices(as_slice_stack(volume_array(input_node), numpy_axis), NOISE_READING_SLICES)))

    def _reading(self, input_node, what, read: Callable):
        """`read()` once per volume node, version of its voxels and `what`: reading the noise of a large volume
        takes a second or more, and the estimate follows every change of the settings."""
        version = input_node.GetImageData().GetMTime()
        known_version, readings = self._readings.get(input_node.GetID(), (None, {}))
        if known_version != version:
            readings = {}
        if what not in readings:
            readings[what] = read()
        self._readings[input_node.GetID()] = (version, readings)
        return readings[what]

    # ---- denoising ------------------------------------------------------------------

    def denoise(self, input_node, settings: DenoiseSettings, output_node=None) -> JobOutcome:
        """Denoise and wait (scripts, tests): the blocking path through the same worker."""
        return self.denoise_job(input_node, settings, output_node).start(wait_for_completion=True).outcome

    def denoise_job(self, input_node, settings: DenoiseSettings, output_node=None) -> Job:
        """A job (connect its signals, then `start()`) that denoises `input_node`; the result fills
        `output_node`, or a new volume named after the input."""
        _check_denoise_request(input_node, settings)
        return self._denoise_job("denoise", input_node, settings, output_node)

    def preview_job(self, input_node, settings: DenoiseSettings, view: str = "Red") -> Job:
        """A job that denoises only the slice of `input_node` through the centre of `view`: the
        settings judged in seconds, even Full mode on a CPU. The one-slice result sits in place
        in a volume named "<input> preview", reused by the next preview of the same input."""
        _check_denoise_request(input_node, settings)
        axis, index = self.slice_in_view(input_node, settings.slice_axis, view)
        scene = self.scene
        output_node = next((node for node in self.nodes_of_class("vtkMRMLScalarVolumeNode")
                            if node.GetAttribute(PREVIEW_OF) == input_node.GetID()), None)
        if output_node is None:
            output_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                                  scene.GenerateUniqueName("%s preview" % input_node.GetName()))
            output_node.SetAttribute(PREVIEW_OF, input_node.GetID())
        return self._denoise_job("preview", input_node, replace(settings, slice_axis=axis), output_node,
                                 (IJK_AXIS[axis], index))

    def slice_in_view(self, input_node, slice_axis: str = "auto", view: str = "Red") -> Tuple[str, int]:
        """(voxel axis, index) of the slice of `input_node` through the centre of a slice view, taken
        across the axis the worker slices along (`slice_axis`, or the coarsest spacing for auto)."""
        import vtk

        dims = input_node.GetImageData().GetDimensions()
        slice_axis = slice_axis_name(input_node, slice_axis)
        slice_node = next((node for node in self.nodes_of_class("vtkMRMLSliceNode")
                           if node.GetLayoutName() == view), None)
        if slice_node is None:
            raise ValueError("There is no %s slice view to take the preview slice from." % view)
        centre = [slice_node.GetSliceToRAS().GetElement(row, 3) for row in range(3)]
        parent = input_node.GetParentTransformNode()
        if parent is not None:
            world_to_volume = vtk.vtkGeneralTransform()
            parent.GetTransformFromWorld(world_to_volume)
            centre = list(world_to_volume.TransformPoint(centre))
        ras_to_ijk = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(ijk_to_ras(input_node), ras_to_ijk)
        ijk = ras_to_ijk.MultiplyPoint(centre + [1.0])
        index = int(round(ijk[IJK_AXIS[slice_axis]]))
        if not 0 <= index < dims[IJK_AXIS[slice_axis]]:
            raise ValueError("The %s view shows no slice of %s across its %s axis: scroll it onto the volume."
                             % (view, input_node.GetName(), slice_axis))
        return slice_axis, index

    def _denoise_job(self, kind: str, input_node, settings: DenoiseSettings, output_node,
                     one_slice: Optional[Tuple[int, int]] = None) -> Job:
        """The worker run behind Denoise and Preview; `one_slice` is (IJK axis, index) for a preview."""
        temp_dir = self._make_temp_dir()
        input_path = os.path.join(temp_dir, "input.nrrd")
        output_path = os.path.join(temp_dir, "output.nrrd")
        uncertainty_path = os.path.join(temp_dir, "uncertainty.nrrd") if (
            settings.uncertainty and settings.mode == "full") else ""
        try:
            write_volume(input_node, input_path)
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        stop_file = os.path.join(temp_dir, "stop")
        args = worker_protocol.denoise_command(self.python, input_path, output_path, settings.mode, settings.model,
                                               settings.device, settings.steps, settings.pairs, uncertainty_path,
                                               stop_file, settings.slice_axis,
                                               str(one_slice[1]) if one_slice else "", settings.rician_bias)

        def on_success(result: dict) -> JobOutcome:
            output = self._import_result(output_path, input_node, output_node, "denoised", one_slice)
            output.SetAttribute("DiffDenoise.Mode", settings.mode)
            output.SetAttribute("DiffDenoise.Model", str(result.get("model", settings.model)))
            uncertainty = None
            if uncertainty_path and os.path.exists(uncertainty_path):  # none when filters alone made the image
                uncertainty = self._import_result(uncertainty_path, input_node, None, "uncertainty", one_slice)
                uncertainty.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeIron")
                uncertainty.GetDisplayNode().SetAutoWindowLevel(True)
            self.show_comparison(input_node, output)
            seconds = result.get("seconds")
            took = " in %s" % worker_protocol.format_seconds(seconds) if isinstance(seconds, (int, float)) else ""
            what = input_node.GetName() if one_slice is None else "slice %d (%s axis) of %s" % (
                one_slice[1], settings.slice_axis, input_node.GetName())
            message = "Denoised %s%s." % (what, took)
            made_by = result.get("details", {}).get("filters_made_the_image")
            if uncertainty_path and uncertainty is None and made_by == "volumetric filter":
                noise = ("faint and mildly correlated" if result["details"].get("faint_noise") else
                         "spatially correlated") if result["details"].get("correlated_noise") else "white"
                message += (" No uncertainty map: the noise looks %s, so the volumetric filter made the image "
                            "and the networks did not run." % noise)
            elif uncertainty_path and uncertainty is None and made_by:
                message += (" No uncertainty map: the noise looks spatially correlated, so block-matching filters "
                            "made the image (the networks' result only showed where to read the noise).")
            if result.get("details", {}).get("anatomy_given_back"):
                message += (" The noise is faint and what the networks removed followed the volume's edges (fine "
                            "anatomy with the noise): %.0f%% of the input was given back." %
                            (100 * result["details"]["observation_share"]))
            weight = result.get("details", {}).get("wiener_noise_scale")
            if weight:
                output.SetAttribute("DiffDenoise.WienerNoiseWeight", "%g" % weight)
                message += (" The Wiener filter weighed the noise %g times, as recorrupted copies of the volume chose "
                            "(flat tissue wants it weighed more, fine texture less)." % weight)
            if result.get("details", {}).get("rician_bias_removed"):
                sigma = result["details"]["rician_sigma"]
                output.SetAttribute("DiffDenoise.RicianSigma", "%g" % sigma)
                why = ("The volume reads as MR magnitude data" if settings.rician_bias == "auto" else
                       "As Rician bias 'remove' asked, the volume was taken as MR magnitude data")
                message += (" %s: the bias its Rician noise (sigma %.4g in its units) leaves, brighter air and dark "
                            "tissue, was removed from the result." % (why, sigma))
            if result.get("details", {}).get("padding"):
                message += " " + worker_protocol.describe_padding(result["details"]["padding"])
            message += suggestion_for_the_noise(result.get("suggested_model"))
            return JobOutcome(kind, "done", message, 0, result, output, uncertainty,
                              str(result.get("model", settings.model)))

        return Job(kind, WorkerProcess(args, env=self.env, stop_file=stop_file), temp_dir, on_success,
                   self.timer_factory)

    def _import_result(self, path: str, input_node, output_node, suffix: str,
                       one_slice: Optional[Tuple[int, int]] = None):
        """Read the worker's file into a volume with exactly the input's geometry (or, for `one_slice`
        = (IJK axis, index), that slice of it), window/level and place."""
        import slicer

        scene = self.scene
        if output_node is None:
            output_node = scene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", scene.GenerateUniqueName("%s %s" % (input_node.GetName(), suffix)))
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(path)
        if not storage.ReadData(output_node):
            raise RuntimeError("could not read %s" % os.path.basename(path))
        expected = list(input_node.GetImageData().GetDimensions())
        matrix = ijk_to_ras(input_node)
        if one_slice is not None:
            axis, index = one_slice
            expected[axis] = 1
            for row in range(3):  # the origin moves to the slice: IJKToRAS applied to index along the axis
                matrix.SetElement(row, 3, matrix.GetElement(row, 3) + index * matrix.GetElement(row, axis))
        if list(output_node.GetImageData().GetDimensions()) != expected:
            raise RuntimeError("the worker returned a volume of another size")
        output_node.SetIJKToRASMatrix(matrix)
        output_node.SetNodeReferenceID(SOURCE_REFERENCE, input_node.GetID())
        output_node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())
        if output_node.GetDisplayNode() is None:
            output_node.CreateDefaultDisplayNodes()
        source_display = input_node.GetDisplayNode()
        display = output_node.GetDisplayNode()
        if source_display is not None:
            display.SetAndObserveColorNodeID(source_display.GetColorNodeID())
            display.SetAutoWindowLevel(False)
            display.SetWindowLevel(source_display.GetWindow(), source_display.GetLevel())
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        if hierarchy is not None:
            source_item = hierarchy.GetItemByDataNode(input_node)
            parent = hierarchy.GetItemParent(source_item) if source_item else hierarchy.GetSceneItemID()
            item = hierarchy.GetItemByDataNode(output_node)
            if item:
                hierarchy.SetItemParent(item, parent)
            else:
                hierarchy.CreateItem(parent, output_node)
        return output_node

    # ---- training -------------------------------------------------------------------

    def train(self, volume_nodes: Sequence, settings: TrainSettings) -> JobOutcome:
        """Train and wait (scripts, tests)."""
        return self.training_job(volume_nodes, settings).start(wait_for_completion=True).outcome

    def training_job(self, volume_nodes: Sequence, settings: TrainSettings) -> Job:
        """A job that trains (or adapts, with `from_model`) a model on scene volumes."""
        if not settings.name.strip():
            raise ValueError("Give the new model a name.")
        nodes = [node for node in volume_nodes if node is not None and node.GetImageData() is not None]
        if not nodes:
            raise ValueError("Choose at least one volume to train on.")
        temp_dir = self._make_temp_dir()
        paths = [os.path.join(temp_dir, "train_%d.nrrd" % index) for index in range(len(nodes))]
        stop_file = os.path.join(temp_dir, "stop")
        try:
            for node, path in zip(nodes, paths):
                write_volume(node, path)
            args = worker_protocol.train_command(self.python, paths, settings.name.strip(), settings.stages,
                                                 settings.from_model, settings.max_steps, settings.device,
                                                 stop_file, settings.noise, settings.context_slices,
                                                 settings.blind_spot_radius)
        except Exception:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise

        def on_success(result: dict) -> JobOutcome:
            name = str(result.get("model", result.get("name", settings.name.strip())))
            return JobOutcome("train", "done", "Model %s is trained and ready." % name, 0, result, model=name)

        return Job("train", WorkerProcess(args, env=self.env, stop_file=stop_file), temp_dir, on_success,
                   self.timer_factory)

    # ---- comparison in the slice views ------------------------------------------------

    def nodes_of_class(self, class_name: str) -> list:
        scene = self.scene
        return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]

    def composite_nodes(self) -> list:
        return self.nodes_of_class("vtkMRMLSliceCompositeNode")

    def source_volume(self, result_node):
        """The volume a result was computed from (kept as a node reference, so it survives scene save/load)."""
        return result_node.GetNodeReference(SOURCE_REFERENCE) if result_node is not None else None

    def show_comparison(self, original_node, denoised_node, fade: float = 1.0) -> None:
        """Denoised as background, original as foreground: the fade (0 original .. 1 denoised) compares them."""
        for composite in self.composite_nodes():
            composite.SetBackgroundVolumeID(denoised_node.GetID())
            composite.SetForegroundVolumeID(original_node.GetID())
            composite.SetForegroundOpacity(1.0 - fade)

    def set_fade(self, fade: float) -> None:
        """0 shows the original, 1 the denoised volume, in between a blend (in every slice view)."""
        for composite in self.composite_nodes():
            composite.SetForegroundOpacity(min(1.0, max(0.0, 1.0 - fade)))

    def show_side_by_side(self, original_node, denoised_node) -> None:
        """Two linked views: original on the left (Red), denoised on the right (Yellow), same slice."""
        import slicer

        scene = self.scene
        layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if layout is not None:
            layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        slice_nodes = {node.GetLayoutName(): node for node in self.nodes_of_class("vtkMRMLSliceNode")}
        if "Red" in slice_nodes and "Yellow" in slice_nodes:
            slice_nodes["Yellow"].GetSliceToRAS().DeepCopy(slice_nodes["Red"].GetSliceToRAS())
            slice_nodes["Yellow"].UpdateMatrices()
        for composite in self.composite_nodes():
            name = composite.GetLayoutName()
            if name not in ("Red", "Yellow"):
                continue
            composite.SetBackgroundVolumeID((original_node if name == "Red" else denoised_node).GetID())
            composite.SetForegroundVolumeID(None)
            composite.SetLinkedControl(True)
            composite.SetHotLinkedControl(True)

    def show_uncertainty(self, denoised_node, uncertainty_node, opacity: float = 0.5) -> None:
        """The uncertainty map (colour) over the denoised volume in every slice view."""
        for composite in self.composite_nodes():
            composite.SetBackgroundVolumeID(denoised_node.GetID())
            composite.SetForegroundVolumeID(uncertainty_node.GetID())
            composite.SetForegroundOpacity(opacity)

    def _make_temp_dir(self) -> str:
        return tempfile.mkdtemp(prefix="DiffDenoise-", dir=self.temp_root)


def slice_axis_name(volume_node, slice_axis: str = "auto") -> str:
    """The voxel axis (x, y or z) the worker slices `volume_node` across: `slice_axis`, or for auto the
    coarsest spacing, as the worker chooses it."""
    if slice_axis != "auto":
        return slice_axis
    from DiffDenoiseLib.slicing import choose_slice_axis

    dims = volume_node.GetImageData().GetDimensions()
    return "zyx"[choose_slice_axis(volume_node.GetSpacing(), dims[::-1]) if dims[2] > 1 else 0]


def _card_run(card: dict, side: int):
    """(architecture, sampling, whether fusion and the filters after the networks run) of `card`'s model on slices
    of `side` voxels or more."""
    from DiffDenoiseLib.networks import NetworkConfig
    from DiffDenoiseLib.noise import MIN_SIDE_TO_JUDGE_NOISE
    from DiffDenoiseLib.pipeline import SamplingConfig

    architecture = NetworkConfig.from_dict(card.get("architecture") or {})
    sampling = SamplingConfig.from_dict(card.get("sampling") or {})
    return architecture, sampling, sampling.fusion and side >= MIN_SIDE_TO_JUDGE_NOISE


def suggestion_for_the_noise(suggested: Optional[dict]) -> str:
    """The worker's `suggested_model` (a model made for spatially correlated noise, offered where the model run has
    a one-pixel blind spot) in the panel's words, or ""."""
    if not suggested:
        return ""
    if suggested.get("noise") == "faint":
        return (" The noise does not look white but is faint: weak spatially correlated noise or fine anatomy, which "
                "the noise reading cannot tell apart. If it is noise, the model '%s' (choose it under Model) "
                "separates it better, at some risk to fine detail." % suggested["model"])
    return (" The noise looks spatially correlated, which this model's one-pixel blind spot separates poorly: the "
            "model '%s' (choose it under Model) separates it better." % suggested["model"])


def filter_reach(card: dict, side: int) -> Tuple[int, int]:
    """How many slices either way of a slice range the filters after `card`'s model's networks gather patches from
    (`pipeline.correlated_filter_reach`) and the networks run on (`pipeline.networks_reach`), on slices of `side`
    voxels or more."""
    from DiffDenoiseLib.pipeline import correlated_filter_reach, networks_reach

    architecture, _, fuse = _card_run(card, side)
    return (correlated_filter_reach(architecture), networks_reach(architecture)) if fuse else (0, 0)


def run_stages(card: dict, mode: str, steps: int, pairs: int, slices: int, side: int, white: bool,
               strong: bool, noise_shape: bool = False) -> Dict[str, float]:
    """{stage of benchmarks/stage_costs.py: passes over the image} of a run of `card`'s model in `mode` (0 steps or
    pairs: the model's) on `slices` slices of `side` voxels or more, as `pipeline.denoise_image` chooses them.

    Under white noise a 2.5D model's volume goes to the volumetric filter alone, and a one-pixel 2.5D model's under
    `strong` noise that is not white, or faint noise whose shape is read, to that filter too, which reads the noise's
    shape there and where `noise_shape`
    (`pipeline.filters_read_the_noise_shape`; the read a stage of its own, counted once a scan, as a 2D model's
    filters under white-looking noise then read it too); otherwise the networks run, and
    then, with fusion, under white noise the filters of the model's kind, under correlated noise the filters with
    exact variances after a wide blind spot, or a 2D model when the noise is `strong` and the slices large enough
    (`pipeline.MIN_SIDE_FOR_ONE_PIXEL_FILTERS`; a 2.5D model's Fast mode
    also runs that blind spot, whose estimate matches the Wiener step's groups). `white` and `strong` are the
    binning reading's (Fast's and the volumetric filter's test, `noise.reading_is_strong`); Full's test of the
    networks' residual is taken to agree with it. Fast's student runs a second time for the share of the input it
    gives back, under white noise and under faint noise (counted whether or not it is given).
    """
    from DiffDenoiseLib.pipeline import (
        correlated_filters_follow, filters_2d_read_the_noise_shape, deep_wiener_groups,
        volumetric_filter_follows,
    )
    from DiffDenoiseLib.noise_weight import PROBES, probe_pixels
    from DiffDenoiseLib.wiener import CUBE, noise_shape_steps, shape_read_steps

    architecture, sampling, fuse = _card_run(card, side)
    context = architecture.context_slices
    # the shape is read on faint noise only where it reads mildly correlated (`pipeline.filters_read_the_noise_shape`)
    if fuse and slices >= CUBE and volumetric_filter_follows(architecture, white, strong, noise_shape and not strong):
        if noise_shape or not white:
            # the read takes as long on a long scan as on 24 slices; noise that reads white by the binning ratio is
            # taken to read white in the filter too
            read = {"noise_shape_read": shape_read_steps(slices, range(slices)) / slices}
            if not white:
                return {"correlated_volumetric_filter": 1, **read}
            deep = deep_wiener_groups(mode)
            return {"shaped_volumetric_filter_deep_groups" if deep else "shaped_volumetric_filter": 1, **read}
        return {"volumetric_filter_deep_groups" if deep_wiener_groups(mode) else "volumetric_filter": 1}
    if mode == "fast":
        # the second pass measures the share of the input kept: under white noise, and where the networks' result
        # under faint noise may have taken anatomy (`pipeline.give_back_where_anatomy_was_taken`)
        stages = {"student": 2 if fuse and (white or not strong) else 1}
    else:
        stages = {"bsn_wide" if architecture.blind_spot_radius else "bsn": sampling.self_ensemble,
                  "diffusion": 2 * (steps or sampling.steps) * (pairs or sampling.pairs)}
    if fuse and white:
        filters = "filters_2d_deep_groups" if deep_wiener_groups(mode) else "filters_2d"
        stages["wiener_context" if context else filters] = 1
        if not context and not filters_2d_read_the_noise_shape(side, noise_shape):
            # the noise's weight is chosen once an image, on crops of its middle slice (taken as square)
            stages["noise_weight_2d_deep_groups" if deep_wiener_groups(mode) else "noise_weight_2d"] = (
                PROBES * probe_pixels((side, side)) / side ** 2 / slices)
        elif not context:
            # a 2D model's filters read the shape on COVARIANCE_SLICES slices at most (wiener.noise_shape_steps), then
            # take about their white-noise time: on 24 slices of the 256x256 phantom (AMD EPYC, 2026-12-07) Full's
            # hard step 21 s against 20, its Wiener step 73 against 66, the read 24 s more (118 s counted 120, where
            # twice the filters counted 176); Fast 61 s counted 63; one slice Full 5.9 s counted 5.7 (7.3), Fast 2.4
            # counted 3.3 (2.6)
            stages["noise_shape_read_2d"] = noise_shape_steps(range(slices)) / slices
    elif fuse and correlated_filters_follow(architecture, lambda: strong, side):
        stages["correlated_wiener_context" if context else "correlated_filters_2d"] = 1
        if mode == "fast" and context:  # a blind-spot estimate matches the Wiener step's groups
            stages["bsn_wide"] = sampling.self_ensemble
    return stages


def volume_array(volume_node):
    """The voxels of `volume_node` in numpy's (k, j, i) order, as the worker reads the file it is written to."""
    import slicer.util

    return slicer.util.arrayFromVolume(volume_node)


def ijk_to_ras(volume_node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix


def write_volume(volume_node, path: str) -> None:
    """Write a scalar volume (in its own coordinates, as Slicer's Save does) for the worker to read."""
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(False)
    if not storage.WriteData(volume_node):
        raise RuntimeError("could not write %s to a temporary file" % volume_node.GetName())


def default_python() -> List[str]:
    """The interpreter for the worker: Slicer's PythonSlicer inside Slicer, else this Python."""
    python_slicer = shutil.which("PythonSlicer")
    if python_slicer and "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        return [python_slicer]
    return [sys.executable]


def worker_environment() -> Dict[str, str]:
    """The environment for the worker: this library first on the path (the worker runs the same code)."""
    env = dict(os.environ)
    slicer = sys.modules.get("slicer")
    if slicer is not None and hasattr(slicer, "app"):
        env = dict(slicer.util.startupEnvironment())
    paths = [LIBRARY_PARENT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
