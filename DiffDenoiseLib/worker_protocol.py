"""How the Slicer module talks to the command-line worker.

The worker is `python -m DiffDenoiseLib ... --json`: one JSON object a line on
stdout (`progress`, `checkpoint`, `log`, `result`, `error`) and a documented exit
code. This module builds those command lines and reads those lines; it does not
run anything.
"""

import json
from typing import List, Optional, Sequence

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3


def parse_line(line: str) -> dict:
    """One line of worker output as an event; anything that is not a JSON event becomes a `log` event."""
    text = line.rstrip("\r\n")
    if text.startswith("{"):
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            return event
    return {"event": "log", "message": text}


def describe_exit(code: int) -> str:
    """A sentence for a worker's exit code (see the command line's documented codes)."""
    if code == EXIT_OK:
        return "finished"
    if code == EXIT_BAD_INPUT:
        return "the worker refused its input"
    if code == EXIT_CANCELLED:
        return "cancelled"
    if code < 0:
        return "stopped by signal %d" % -code
    return "failed with an internal error (exit code %d)" % code


def format_seconds(seconds: Optional[float]) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`: short enough for a progress bar."""
    if seconds is None:
        return ""
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return "%d s" % seconds
    if seconds < 3600:
        return "%d min %02d s" % (seconds // 60, seconds % 60)
    return "%d h %02d min" % (seconds // 3600, (seconds % 3600) // 60)


def describe_padding(padding: dict) -> str:
    """What the result's `details["padding"]` ({"value", "voxels"}) means, for the log and the module's message."""
    return (f"{padding['voxels']:,} voxels of padding outside the field of view (the value {padding['value']:g}, "
            "far below the rest) were kept out of the intensity range the networks work in and left as they were.")


def _base(python: Sequence[str], command: str) -> List[str]:
    return list(python) + ["-m", "DiffDenoiseLib", command]


def denoise_command(python: Sequence[str], input_path: str, output_path: str, mode: str = "fast",
                   model: str = "", device: str = "auto", steps: int = 0, pairs: int = 0,
                   uncertainty_path: str = "", stop_file: str = "", slice_axis: str = "auto",
                   slices: str = "", rician_bias: str = "auto") -> List[str]:
    """`denoise` command line; `model=""` lets the worker choose the shipped default, 0 keeps the model's steps/pairs.

    `slices` ("START:STOP" or one index along the slice axis) denoises only those slices.
    """
    args = _base(python, "denoise") + [input_path, output_path, "--mode", mode, "--device", device,
                                       "--slice-axis", slice_axis, "--rician-bias", rician_bias]
    if slices:
        args += ["--slices", slices]
    if model:
        args += ["--model", model]
    if steps > 0:
        args += ["--steps", str(steps)]
    if pairs > 0:
        args += ["--pairs", str(pairs)]
    if uncertainty_path:
        args += ["--uncertainty", uncertainty_path]
    if stop_file:
        args += ["--stop-file", stop_file]
    return args + ["--json"]


def train_command(python: Sequence[str], input_paths: Sequence[str], name: str,
                 stages: Sequence[str] = ("bsn", "diffusion", "student"), from_model: str = "",
                 max_steps: int = 0, device: str = "auto", stop_file: str = "", noise: str = "gaussian",
                 context_slices: int = 0, blind_spot_radius: int = 0) -> List[str]:
    """`train` command line; `max_steps=0` keeps each stage's full default length.

    A model adapted `from_model` keeps its architecture and noise transform, so the
    noise, 2.5D context and blind-spot settings are only sent for a new model.
    """
    if not input_paths:
        raise ValueError("training needs at least one volume")
    if not stages:
        raise ValueError("choose at least one training stage")
    args = _base(python, "train") + list(input_paths) + ["--name", name, "--stages", ",".join(stages),
                                                         "--device", device]
    if from_model:
        args += ["--from", from_model]
    else:
        args += ["--noise", noise, "--context-slices", str(context_slices),
                 "--blind-spot-radius", str(blind_spot_radius)]
    if max_steps > 0:
        args += ["--max-steps", str(max_steps)]
    if stop_file:
        args += ["--stop-file", stop_file]
    return args + ["--json"]


def models_command(python: Sequence[str]) -> List[str]:
    return _base(python, "models") + ["--json"]
