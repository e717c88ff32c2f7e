"""The `diffdenoise` command: `denoise`, `train`, `models`, `info`.

It is both the researcher's tool and the worker the Slicer module runs in the
background, so its interface is a contract (README, `worker_protocol.py`). Exit codes:
0 success; 2 bad input or usage, with one sentence naming the problem and no
traceback; 3 cancelled (SIGTERM, Ctrl-C or the stop file; training saves a checkpoint
first); 1 anything else, with the traceback kept in a log file whose path is given.
Outputs appear under their final names only when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from DiffDenoiseLib import __version__
from DiffDenoiseLib.device import select_device
from DiffDenoiseLib.events import Reporter
from DiffDenoiseLib.imageio import Image, read_image, write_image
from DiffDenoiseLib.magnitude import MODES as RICIAN_MODES
from DiffDenoiseLib.networks import VIEW_COUNTS, NetworkConfig
from DiffDenoiseLib.noise import binning_noise_reading, reading_looks_correlated, strength_needed
from DiffDenoiseLib.pipeline import (MADE_BY_VOLUMETRIC_FILTER, MODES, STAGES, SamplingConfig, denoise_image,
                                     slice_range_image)
from DiffDenoiseLib.preview import before_after_png
from DiffDenoiseLib.progress import CancelToken, Cancelled, Progress
from DiffDenoiseLib.slicing import choose_slice_axis
from DiffDenoiseLib.store import ModelStore, load_model, model_for_correlated_noise, save_model, validate_name
from DiffDenoiseLib.training import TrainConfig, train_model
from DiffDenoiseLib.wiener import CUBE
from DiffDenoiseLib.worker_protocol import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_OK, describe_padding, format_seconds

EXIT_INTERNAL = 1
MODE_STAGES = {"fast": ("student",), "full": ("bsn", "diffusion"), "single": ("bsn", "diffusion"), "bsn": ("bsn",)}
CONFIG_SECTIONS = ("network", "training", "sampling", "transform")
REQUEST_FILE = "request.json"
# numpy axis of each voxel axis (SimpleITK's arrays are indexed z, y, x)
SLICE_AXES = {"auto": None, "z": 0, "y": 1, "x": 2}
NOISE_TRANSFORMS = {"gaussian": "none", "poisson": "anscombe", "gamma": "log", "rician": "rician"}
# Settings a resumed training may change; any other change makes the old checkpoints unusable.
RESUMABLE_CHANGES = ("stages", "max_steps", "bsn_steps", "diffusion_steps", "student_steps", "checkpoint_seconds")
# The library reports bad input and settings with these; the command answers them with exit 2.
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class UsageError(Exception):
    """Bad input or usage: the command exits 2 with this sentence."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises instead of printing usage and exiting, so --json can report it."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got '{text}'")
    return value


def _slice_range(text: str):
    """START:STOP (Python's half-open range) or a single slice number."""
    parts = text.split(":")
    try:
        start, stop = (int(parts[0]), int(parts[0]) + 1) if len(parts) == 1 else tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP or one slice number, got '{text}'") from None
    return start, stop


def build_parser() -> argparse.ArgumentParser:
    json_flag = _Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="write one JSON event a line on stdout")
    store_flag = _Parser(add_help=False)
    store_flag.add_argument("--store", metavar="DIR", help="user model store (default: $DIFFDENOISE_MODELS or "
                                                           "~/.diffdenoise/models)")
    work_flags = _Parser(add_help=False)
    work_flags.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    work_flags.add_argument("--stop-file", metavar="PATH", help="stop cleanly (exit 3) when this file appears")

    parser = _Parser(prog="diffdenoise", description="Self-supervised denoising of CT, MRI and X-ray images.",
                     epilog="Exit codes: 0 success, 2 bad input or usage, 3 cancelled, 1 internal error.")
    parser.add_argument("--version", action="version", version=f"diffdenoise {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    denoise = commands.add_parser("denoise", parents=[json_flag, store_flag, work_flags],
                                  help="denoise an image or volume")
    denoise.add_argument("input", metavar="INPUT", help="image file (NRRD, NIfTI, MHA, ...) or DICOM series folder")
    denoise.add_argument("output", metavar="OUTPUT", help="output image file; written only when complete")
    denoise.add_argument("--model", metavar="NAME|PATH", help="model name or folder (default: the shipped "
                                                              "default for the image's modality)")
    denoise.add_argument("--mode", choices=MODES, default="fast",
                         help="fast: student network (default); full: diffusion with symmetric sampling; "
                              "bsn, single: blind-spot network alone or one diffusion sample, for comparison")
    denoise.add_argument("--steps", type=_positive, metavar="N", help="DDIM steps in full mode (default: the model's)")
    denoise.add_argument("--pairs", type=_positive, metavar="N",
                         help="symmetric pairs averaged in full mode (default: the model's)")
    denoise.add_argument("--self-ensemble", type=int, choices=VIEW_COUNTS, metavar="VIEWS",
                         help="modes bsn, single and full: flips and turns of the image (1, 2, 4 or 8) whose "
                              "blind-spot estimates are averaged; fewer are faster (default: the model's)")
    denoise.add_argument("--uncertainty", metavar="PATH", help="also write the uncertainty map (full mode)")
    denoise.add_argument("--no-fusion", dest="fusion", action="store_false", default=None,
                         help="keep the networks' estimate as it is instead of giving each voxel's own noisy "
                              "value back (in fast mode: the share Stein's risk estimate prefers; for comparison)")
    denoise.add_argument("--rician-bias", choices=RICIAN_MODES, default="auto",
                         help="MR magnitude images: auto removes the bias Rician noise leaves in the result "
                              "(brighter air and dark tissue) when the image reads as magnitude data (MR, no "
                              "voxel below 0, noise following the Rician law); remove always; keep never")
    denoise.add_argument("--slice-axis", choices=tuple(SLICE_AXES), default="auto",
                         help="voxel axis the slices are taken across: z (the third index, axial for most "
                              "scans), y or x; auto takes the coarsest spacing")
    denoise.add_argument("--slices", type=_slice_range, metavar="START:STOP",
                         help="denoise only these slices along the slice axis (0-based, STOP excluded; one number "
                              "for one slice) and write them as a sub-volume in place: a quick look before a "
                              "whole-volume run")
    denoise.add_argument("--preview", metavar="PNG", help="also write a before | after | removed picture of the "
                                                          "middle slice")

    train = commands.add_parser("train", parents=[json_flag, store_flag, work_flags],
                                help="train or adapt a model on noisy images")
    train.add_argument("inputs", nargs="+", metavar="INPUT", help="noisy training images or DICOM series folders")
    train.add_argument("--name", required=True, help="name of the new model in the store")
    train.add_argument("--stages", help="comma-separated stages to train (default: bsn,diffusion,student)")
    train.add_argument("--from", dest="from_model", metavar="MODEL", help="start from this model's networks")
    train.add_argument("--max-steps", type=_positive, metavar="N", help="cap every stage's optimisation steps")
    train.add_argument("--noise", choices=tuple(NOISE_TRANSFORMS),
                       help="noise of the images, choosing the variance-stabilising transform: gaussian (none), "
                            "poisson (Anscombe), gamma (log), rician (MR magnitude); default gaussian")
    train.add_argument("--context-slices", type=int, metavar="K",
                       help="neighbouring slices on each side given to the networks (2.5D); default 0")
    train.add_argument("--blind-spot-radius", type=int, metavar="R",
                       help="hide a (2R+1)^2 square instead of one pixel, for spatially correlated noise")
    train.add_argument("--config", metavar="JSON", help="settings file with any of the sections "
                                                        + ", ".join(CONFIG_SECTIONS))

    commands.add_parser("models", parents=[json_flag, store_flag], help="list shipped and user models")
    commands.add_parser("info", parents=[json_flag], help="devices, memory and library versions")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with Reporter("--json" in argv) as reporter:
        try:
            args = build_parser().parse_args(argv)
        except UsageError as error:
            reporter.error(str(error))
            return EXIT_BAD_INPUT
        cancel = CancelToken(getattr(args, "stop_file", None))
        with _cancel_on_signals(cancel):
            return _run(args, argv, reporter, cancel)


def _run(args, argv, reporter: Reporter, cancel: CancelToken) -> int:
    try:
        COMMANDS[args.command](args, reporter, cancel)
        return EXIT_OK
    except (Cancelled, KeyboardInterrupt) as stop:
        reporter.log(f"Cancelled: {stop}" if str(stop) else "Cancelled.")
        return EXIT_CANCELLED
    except (UsageError,) + BAD_INPUT as error:
        reporter.error(_sentence(error))
        return EXIT_BAD_INPUT
    except Exception as error:
        log = _write_crash_log(getattr(args, "store", None), argv)
        reporter.error(f"internal error ({type(error).__name__}: {_sentence(error)}); the details are in {log}")
        return EXIT_INTERNAL


@contextlib.contextmanager
def _cancel_on_signals(cancel: CancelToken):
    """SIGTERM and a first Ctrl-C set the cancel token (work stops at its next check); a second Ctrl-C interrupts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        if signum == signal.SIGINT and cancel.cancelled:
            raise KeyboardInterrupt("interrupted")
        cancel.cancel()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _sentence(error: BaseException) -> str:
    """The error as one line; OS errors name their file."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def _write_crash_log(store_dir: Optional[str], argv: Sequence[str]) -> Path:
    """Write the current exception's traceback under the store's `logs/` (else the temp folder); return the path."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (f"diffdenoise {__version__}, torch {torch.__version__}, Python {platform.python_version()}\n"
            f"command: diffdenoise {' '.join(argv)}\n\n{traceback.format_exc()}")
    folders = (ModelStore(store_dir).user_dir / "logs", Path(tempfile.gettempdir()) / "diffdenoise-logs")
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"diffdenoise-{stamp}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return Path("(no writable log folder)")


def _check_writable(path: Path, ndim: int) -> None:
    """Fail before the work rather than after it: write a tiny float image of the same dimension beside `path`."""
    with tempfile.TemporaryDirectory(prefix=".diffdenoise-probe-", dir=str(path.parent)) as folder:
        try:
            write_image(Image(array=np.zeros((2,) * ndim, dtype=np.float32)), Path(folder) / path.name)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else "no writer"
            raise UsageError(f"cannot write {path}: SimpleITK cannot save a {ndim}D float image in this format "
                             f"({reason})") from None


def _check_output(path: Path, inputs: Sequence[Path]) -> None:
    if not path.name or path.is_dir():
        raise UsageError(f"the output {path} is a folder; give a file name such as {path / 'denoised.nrrd'}")
    if not path.parent.is_dir():
        raise UsageError(f"the output folder {path.parent} does not exist")
    for source in inputs:
        if path.resolve() == source.resolve():
            raise UsageError(f"the output {path} would overwrite {source}; choose another file name")


def _denoise(args, reporter: Reporter, cancel: CancelToken) -> None:
    if args.uncertainty and args.mode != "full":
        raise UsageError("--uncertainty needs --mode full: the map comes from the symmetric sample pairs")
    source, output = Path(args.input), Path(args.output)
    _check_output(output, [source])
    uncertainty_path = Path(args.uncertainty) if args.uncertainty else None
    if uncertainty_path is not None:
        _check_output(uncertainty_path, [source, output])
    preview_path = Path(args.preview) if args.preview else None
    if preview_path is not None:
        _check_output(preview_path, [source, output])
        if preview_path.suffix.lower() != ".png":
            raise UsageError(f"the preview {preview_path} must be a .png file")
    image = read_image(source)
    for path in [output] + ([uncertainty_path] if uncertainty_path else []):
        _check_writable(path, image.array.ndim)
    store = ModelStore(args.store)
    slice_axis = SLICE_AXES[args.slice_axis]
    if slice_axis is not None and image.array.ndim == 2 and slice_axis != 0:
        raise UsageError(f"--slice-axis {args.slice_axis} needs a volume; {source.name} is a 2D image")
    reading = None  # the image's binning_noise_reading, once it has been needed
    if args.model:
        folder = store.resolve(args.model)
    else:
        slices = 1
        if image.array.ndim == 3:
            slices = image.array.shape[choose_slice_axis(image.spacing, image.array.shape)
                                       if slice_axis is None else slice_axis]
        reading = binning_noise_reading(image.array)
        correlated = reading_looks_correlated(reading)
        folder = store.resolve(store.default_for(image.modality, slices, correlated_noise=correlated))
    model = load_model(folder)
    if not args.model:
        origin = "shipped" if folder.parent == store.shipped_dir else f"user copy in {folder.parent}"
        kind = "volumes" if slices > 1 else "single images"
        what = f"the default for {image.modality or 'unknown-modality'} {kind}"
        if correlated and model.card.get("default_for_noise") == "correlated":
            what = "the default for spatially correlated noise, which this image's noise looks like"
        reporter.log(f"Using model '{folder.name}' ({origin}), {what}; choose another with --model.")
    missing = [s for s in MODE_STAGES[args.mode] if s not in model.stages()]
    if missing:
        raise UsageError(f"the model '{folder.name}' has no trained {' or '.join(missing)} stage, which "
                         f"--mode {args.mode} needs (it has: {', '.join(model.stages())})")
    device, message = select_device(args.device)
    reporter.log(message)

    def on_progress(p: Progress) -> None:
        reporter.progress(p.stage, p.step, p.total, p.loss, p.eta_s, p.resumed)

    result = denoise_image(image, model, mode=args.mode, steps=args.steps, pairs=args.pairs, device=device,
                           slice_axis=slice_axis, progress=on_progress, cancel=cancel, fusion=args.fusion,
                           slice_range=args.slices, self_ensemble=args.self_ensemble, rician_bias=args.rician_bias)
    cancel.raise_if_cancelled()
    written = []
    try:
        if uncertainty_path is not None and result.uncertainty is not None:
            write_image(result.uncertainty, uncertainty_path)
            written.append(uncertainty_path)
        write_image(result.image, output)
        written.append(output)
        if preview_path is not None:
            before = image
            if args.slices is not None:
                axis, (start, stop) = result.details["slice_axis"], result.details["slice_range"]
                before = slice_range_image(image, axis, start, np.take(image.array, range(start, stop), axis=axis))
            before_after_png(before, result.image, preview_path, image.modality)
    except BaseException:
        for path in written:
            path.unlink()
        raise
    missing = " (so no uncertainty map was written)" if uncertainty_path is not None else ""
    suggested = None  # {"model", "noise"}: a model made for correlated noise, where the one run separates it poorly
    told_anatomy = False  # whether the account of the noise already said how much of the input went back
    made_by = result.details.get("filters_made_the_image")
    if made_by == MADE_BY_VOLUMETRIC_FILTER and result.details["correlated_noise"]:
        # under noise of a 1.2-pixel kernel a wide blind spot's result and its filters beat this filter (pipeline.py)
        reading = reading or binning_noise_reading(image.array)
        wider = (_model_for_correlated_noise_of(store, image, result.details) if reading_looks_correlated(reading)
                 else None)
        suggested = wider and {"model": wider, "noise": "correlated"}
        why = ("The noise is faint and looks mildly correlated (a sharp reconstruction kernel's), which a one-pixel "
               "network would smooth away with fine anatomy" if result.details.get("faint_noise") else
               "The noise looks spatially correlated, which a one-pixel blind spot passes")
        reporter.log(f"{why}, so the image is the volumetric filter's (BM4D's two steps on cubes of {CUBE} voxels), "
                     "each coefficient's noise computed from the noise's level and its spread between neighbouring "
                     f"voxels, read on the image; the networks did not run{missing}. --no-fusion runs the networks "
                     "alone."
                     + (f" The noise is correlated widely enough for --model {wider}, made for such noise, which "
                        "separates it better." if wider else ""))
    elif made_by == MADE_BY_VOLUMETRIC_FILTER:
        reporter.log("The noise looks white, so the image is the volumetric filter's (BM4D's two steps on cubes of "
                     f"{CUBE} voxels), which beat every use of the networks' result measured on volumes; the networks "
                     f"did not run{missing}. --no-fusion runs the networks alone."
                     + (" The noise is strong enough that the filter read how it spreads between neighbouring voxels, "
                        "as mildly correlated noise would." if result.details.get("noise_shape_read") else ""))
    elif result.details.get("correlated_noise"):
        if result.details.get("filters_made_the_image"):
            reporter.log("The noise looks spatially correlated: observation fusion was skipped, and the image is hard "
                         "thresholding's and the Wiener filter's, each coefficient's noise computed from the noise's "
                         f"covariance, read where the networks' result is flattest{missing}.")
        elif result.details.get("wiener"):
            matched = (" (its groups matched on the blind-spot estimate, the student's result setting the gains)"
                       if result.details.get("groups_matched_on") else
                       " (its groups matched on SRDS's result, the student's result setting the gains)"
                       if result.details.get("wiener_gains_from") else "")
            reporter.log("The noise looks spatially correlated: observation fusion was skipped, and the Wiener filter "
                         f"guided by the networks' result{matched} computed each coefficient's noise from the noise's "
                         "covariance, read where the guide is flattest.")
        else:
            ratio, strength = reading or binning_noise_reading(image.array)
            needed = strength_needed(ratio)
            # where the networks took anatomy with the noise, a wider blind spot would take more of it: none is offered
            wider = (_model_for_correlated_noise_of(store, image, result.details)
                     if model.config.blind_spot_radius == 0 and not result.details.get("anatomy_given_back") else None)
            if strength <= needed:
                # Below that strength the reading cannot tell weak correlated noise from fine anatomy (noise.py).
                skipped = "Observation fusion and the Wiener filter, which need white noise, were skipped"
                if result.details.get("anatomy_given_back"):  # one account of what became of the networks' result
                    skipped = f"The Wiener filter, which needs white noise, was skipped; {_anatomy_given_back(result)}"
                    told_anatomy = True
                reporter.log(f"The noise does not look white but is faint (its std about {strength:.2%} of the "
                             "intensity range; the model for correlated noise is chosen from "
                             f"{needed:.1%}): weak spatially correlated noise (a reconstruction "
                             f"kernel's) or fine anatomy, which the noise reading cannot tell apart. {skipped}"
                             + (f"; if it is noise, --model {wider} separates it better, at some risk to fine detail"
                                if wider else "") + ".")
                suggested = wider and {"model": wider, "noise": "faint"}
            else:
                advice = ""
                if model.config.blind_spot_radius == 0:
                    advice = (", and a one-pixel blind spot cannot separate such noise well; "
                              + (f"--model {wider} can, or " if wider else "")
                              + "a model adapted with --blind-spot-radius 2 or 3 (diffdenoise train --help)")
                    suggested = wider and {"model": wider, "noise": "correlated"}
                reporter.log(f"The noise looks spatially correlated: observation fusion and the Wiener filter were "
                             f"skipped{advice}.")
    elif result.details.get("wiener"):
        guide = ("the networks' result averaged with the image's own hard-thresholding estimate"
                 if result.details.get("hard_threshold") else "the networks' result")
        scale = result.details.get("wiener_noise_scale")
        reporter.log(f"A collaborative Wiener filter of the input, guided by {guide}, gave back the fine structure "
                     "that similar patches agree on (--no-fusion turns it off)."
                     + (f" It weighed the noise {scale:g} times, as recorrupted copies of the image chose (flat tissue "
                        "wants it weighed more, fine texture less)." if scale else "")
                     + (" The noise is strong enough that both filters read how it spreads between neighbouring "
                        "pixels, as mildly correlated noise would." if result.details.get("noise_shape_read") else ""))
    if result.details.get("rician_bias_removed"):
        why = ("The image reads as MR magnitude data, whose" if args.rician_bias == "auto" else
               "As --rician-bias remove asked, the image was taken as MR magnitude data, whose")
        reporter.log(f"{why} Rician noise (sigma {result.details['rician_sigma']:.4g} in the image's units) "
                     "brightens air and dark tissue on average: that bias was removed from the result "
                     "(--rician-bias keep keeps it).")
    if result.details.get("padding"):
        reporter.log(describe_padding(result.details["padding"]))
    if result.details.get("anatomy_given_back"):
        if not told_anatomy:
            clause = _anatomy_given_back(result)
            reporter.log(f"{clause[0].upper()}{clause[1:]}.")
    elif result.details.get("observation_share"):
        reporter.log(f"Fast mode gave back {result.details['observation_share']:.0%} of the difference between the "
                     "input and the student's estimate (the share Stein's risk estimate preferred; --no-fusion "
                     "keeps the estimate as it is).")
    reporter.log(f"Denoised {source.name} with '{folder.name}' ({args.mode} mode, {device.type}) in "
                 f"{_duration(result.seconds)}: wrote {output}.")
    reporter.result({"output": str(output),
                     "uncertainty": str(uncertainty_path) if uncertainty_path in written else None,
                     "preview": str(preview_path) if preview_path else None,
                     "model": folder.name, "model_path": str(folder), "mode": args.mode, "device": str(device),
                     "seconds": round(result.seconds, 3), "shape": list(result.image.array.shape),
                     "details": result.details, "suggested_model": suggested})


def _model_for_correlated_noise_of(store: ModelStore, image, details: dict) -> Optional[str]:
    """The store's model made for correlated noise that suits `image` as the run sliced it (`details`): a 2.5D one
    for a volume deep enough, a 2D one otherwise (`store.model_for_correlated_noise`)."""
    depth = image.array.shape[details["slice_axis"]] if image.array.ndim == 3 else 1
    return model_for_correlated_noise(store.list(), depth)


def _anatomy_given_back(result) -> str:
    """The clause telling how much of the input went back where the networks took anatomy with faint noise
    (pipeline.give_back_where_anatomy_was_taken)."""
    details = result.details
    return (f"what the networks removed follows the image's edges (correlation "
            f"{details['removed_edge_correlation']:.2f}): under faint noise they took fine anatomy with it, so "
            f"{details['observation_share']:.0%} of the difference between the input and their result was given "
            "back (the share Stein's risk estimate preferred; --no-fusion keeps their result as it is)")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else format_seconds(seconds)


def _parse_stages(text: Optional[str]):
    if text is None:
        return None
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UsageError(f"unknown stage(s) '{text}'; choose from {','.join(STAGES)}")
    return tuple(s for s in STAGES if s in stages)


def _read_config(path: Optional[str]) -> dict:
    if path is None:
        return {}
    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as error:
        raise UsageError(f"the settings file {path} is not valid JSON ({error})") from None
    if not isinstance(settings, dict) or set(settings) - set(CONFIG_SECTIONS):
        raise UsageError(f"the settings file {path} must be a JSON object with sections among "
                         f"{', '.join(CONFIG_SECTIONS)}")
    return settings


def _prepare_training_dir(work_dir: Path, request: dict, reporter: Reporter) -> bool:
    """Keep the checkpoints of an interrupted run of the same request (return True); start afresh otherwise."""
    saved = work_dir / REQUEST_FILE
    if work_dir.is_dir():
        try:
            same = json.loads(saved.read_text(encoding="utf-8")) == request
        except (OSError, ValueError):
            same = False
        if same:
            reporter.log(f"Resuming the interrupted training from {work_dir}.")
            return True
        reporter.log(f"Discarding the checkpoints in {work_dir}: they belong to a training with other settings.")
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    saved.write_text(json.dumps(request, indent=2), encoding="utf-8")
    return False


def _train(args, reporter: Reporter, cancel: CancelToken) -> None:
    store = ModelStore(args.store)
    name = validate_name(args.name)
    settings = _read_config(args.config)
    if args.noise is not None:
        settings["transform"] = NOISE_TRANSFORMS[args.noise]
    network_flags = {"context_slices": args.context_slices, "blind_spot_radius": args.blind_spot_radius}
    for key, value in network_flags.items():
        if value is not None:
            if value < 0:
                raise UsageError(f"--{key.replace('_', '-')} must be 0 or more, got {value}")
            settings.setdefault("network", {})[key] = value
    stages = _parse_stages(args.stages)
    training = dict(settings.get("training", {}))
    if stages is not None:
        training["stages"] = stages
    if args.max_steps is not None:
        training["max_steps"] = args.max_steps
    try:
        train_config = TrainConfig.from_dict(training)
        network = NetworkConfig.from_dict(settings["network"]) if "network" in settings else None
        sampling = SamplingConfig.from_dict(settings["sampling"]) if "sampling" in settings else None
    except (TypeError, ValueError) as error:
        raise UsageError(f"invalid training settings: {_sentence(error)}") from None
    images = [read_image(path) for path in args.inputs]
    init_from = load_model(store.resolve(args.from_model)) if args.from_model else None
    device, message = select_device(args.device)
    reporter.log(message)

    request = {"inputs": [str(Path(p).resolve()) for p in args.inputs], "from": args.from_model,
               "network": settings.get("network"), "sampling": settings.get("sampling"),
               "transform": settings.get("transform"),
               "training": {k: v for k, v in train_config.to_dict().items() if k not in RESUMABLE_CHANGES}}
    work_dir = store.training_dir(name)
    resuming = _prepare_training_dir(work_dir, request, reporter)
    first = [True]
    started = time.monotonic()

    def on_progress(p: Progress) -> None:
        reporter.progress(p.stage, p.step, p.total, p.loss, p.eta_s, p.resumed or (resuming and first[0]))
        first[0] = False

    model = train_model(images, work_dir, name, network_config=network, train_config=train_config,
                        transform=settings.get("transform"), sampling=sampling, init_from=init_from,
                        device=device, progress=on_progress, on_checkpoint=reporter.checkpoint, cancel=cancel,
                        log=reporter.log)
    folder = save_model(model, store.model_dir(name))
    shutil.rmtree(work_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        work_dir.parent.rmdir()  # the store's training area, when no other training is unfinished
    seconds = time.monotonic() - started
    reporter.log(f"Model '{name}' ({', '.join(model.stages())}) saved in {folder}.")
    reporter.result({"model": name, "path": str(folder), "stages": model.stages(), "seconds": round(seconds, 1),
                     "training": model.card["training"]["stages"]})


def _models(args, reporter: Reporter, cancel: CancelToken) -> None:
    store = ModelStore(args.store)
    models = store.list()
    lines = [f"Shipped models: {store.shipped_dir}", f"User models: {store.user_dir}", ""]
    for card in models:
        if "error" in card:
            lines.append(f"{card['name']:<24} {card['source']:<8} unusable: {card['error']}")
            continue
        defaults = [str(m) for m in card.get("default_for") or [] if m]
        if card.get("default_for_noise"):
            defaults.append(f"{card['default_for_noise']} noise")
        note = f"  default for {', '.join(defaults)}" if defaults else ""
        lines.append(f"{card['name']:<24} {card['source']:<8} {','.join(card['stages']):<24}{note}")
        if card.get("description"):
            lines.append(f"    {card['description']}")
    if not models:
        lines.append("No models found.")
    reporter.result({"models": models, "shipped_dir": str(store.shipped_dir), "store": str(store.user_dir)},
                    "\n".join(lines))


def _memory_bytes() -> Dict[str, Optional[int]]:
    """Total and available system memory where the OS reports them through sysconf (Linux, macOS)."""
    def pages(name: str) -> Optional[int]:
        try:
            return int(os.sysconf(name)) * int(os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return None

    return {"total": pages("SC_PHYS_PAGES"), "available": pages("SC_AVPHYS_PAGES")}


def system_info() -> dict:
    """Devices, CPU, memory and versions: what a user reports with a problem, and what a job can use."""
    devices = [{"name": "cpu", "description": platform.processor() or platform.machine()}]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append({"name": f"cuda:{index}", "description": props.name, "memory_bytes": props.total_memory})
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append({"name": "mps", "description": "Apple GPU"})
    chosen, message = select_device("auto")
    return {
        "devices": devices, "default_device": str(chosen), "device_message": message,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_bytes": _memory_bytes(),
        "versions": {"diffdenoise": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "SimpleITK": sitk.Version_VersionString(), "python": platform.python_version()},
        "platform": platform.platform(), "store": str(ModelStore().user_dir),
    }


def _gib(value: Optional[int]) -> str:
    return f"{value / 2 ** 30:.1f} GiB" if value else "unknown"


def _describe_device(device: dict) -> str:
    details = [device["description"]] if device.get("description") else []
    if "memory_bytes" in device:
        details.append(_gib(device["memory_bytes"]))
    return device["name"] + (f" ({', '.join(details)})" if details else "")


def _info(args, reporter: Reporter, cancel: CancelToken) -> None:
    info = system_info()
    versions = info["versions"]
    memory = info["memory_bytes"]
    devices = "; ".join(_describe_device(d) for d in info["devices"])
    text = "\n".join([
        f"DiffDenoise {versions['diffdenoise']}: torch {versions['torch']}, numpy {versions['numpy']}, "
        f"SimpleITK {versions['SimpleITK']}, Python {versions['python']}",
        f"Devices: {devices}",
        info["device_message"],
        f"CPU cores: {info['cpu_count']} (torch uses {info['torch_threads']} threads); memory: "
        f"{_gib(memory['total'])} total, {_gib(memory['available'])} available",
        f"Model store: {info['store']}",
    ])
    reporter.result(info, text)


COMMANDS = {"denoise": _denoise, "train": _train, "models": _models, "info": _info}
