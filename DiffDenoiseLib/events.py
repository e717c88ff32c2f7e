"""What `denoise` and `train` tell their caller: JSON lines for programs, a progress bar for people.

With `--json` stdout carries nothing but events, one JSON object a line, flushed at once,
because the Slicer module reads them while the work runs (`worker_protocol.parse_line`).
Anything else that would reach stdout meanwhile (a library's print, a C library writing
to file descriptor 1) is sent to stderr instead. Without `--json` a progress bar and
messages go to stderr, leaving stdout to the listings of `models` and `info`.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import PurePath
from typing import Optional

from DiffDenoiseLib.worker_protocol import format_seconds

BAR_WIDTH = 30


def _plain(value):
    """`value` with numpy scalars, paths and tuples made JSON types and NaN/inf made null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Reporter:
    """Progress, checkpoints, messages, the result and errors of one command.

    Use as a context manager: in JSON mode it takes stdout over for the events and
    points file descriptor 1 and `sys.stdout` at stderr until the block ends.
    """

    def __init__(self, json_mode: bool):
        self.json_mode = json_mode
        self._out = sys.stdout
        self._err = sys.stderr
        self._saved_fd: Optional[int] = None
        self._saved_stdout = None
        self._bar_open = False

    def __enter__(self) -> "Reporter":
        if not self.json_mode:
            return self
        self._saved_stdout = sys.stdout
        if self._saved_stdout is not None:
            self._saved_stdout.flush()
        try:
            os.fstat(1)
            os.fstat(2)
        except OSError:
            pass  # no real stdout/stderr descriptors (a windowed interpreter): redirect Python's writes only
        else:
            self._saved_fd = os.dup(1)
            self._out = io.TextIOWrapper(os.fdopen(os.dup(1), "wb"), encoding="utf-8", line_buffering=True)
            os.dup2(2, 1)
        sys.stdout = self._err
        return self

    def __exit__(self, *exc) -> None:
        if not self.json_mode:
            self._end_bar()
            return
        sys.stdout = self._saved_stdout
        if self._saved_fd is not None:
            self._out.close()
            self._err.flush()
            os.dup2(self._saved_fd, 1)
            os.close(self._saved_fd)
            self._saved_fd = None
        self._out = sys.stdout

    def _emit(self, event: str, **fields) -> None:
        line = json.dumps(_plain(dict(event=event, **fields)), allow_nan=False)
        self._out.write(line + "\n")
        self._out.flush()

    def _say(self, text: str) -> None:
        self._end_bar()
        self._err.write(text + "\n")
        self._err.flush()

    def _end_bar(self) -> None:
        if self._bar_open:
            self._err.write("\n")
            self._err.flush()
            self._bar_open = False

    def progress(self, stage: str, step: int, total: int, loss: Optional[float] = None,
                 eta_s: Optional[float] = None, resumed: bool = False) -> None:
        if self.json_mode:
            self._emit("progress", stage=stage, step=step, total=total, loss=loss, eta_s=eta_s, resumed=resumed)
            return
        filled = int(BAR_WIDTH * min(1.0, step / total)) if total else BAR_WIDTH
        text = f"{stage:<9} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {step}/{total}"
        if loss is not None and math.isfinite(loss):
            text += f"  loss {loss:.4g}"
        if eta_s is not None and step < total:
            text += f"  {format_seconds(eta_s)} left"
        if resumed:
            text += "  (resumed)"
        if self._err.isatty():
            self._err.write("\r" + text.ljust(79))
            self._bar_open = True
            if step >= total:
                self._end_bar()
        else:
            self._err.write(text + "\n")
        self._err.flush()

    def checkpoint(self, stage: str, step: int, path) -> None:
        if self.json_mode:
            self._emit("checkpoint", stage=stage, step=step, path=path)
        else:
            self._say(f"checkpoint saved: {stage} stage, step {step}")

    def log(self, message: str) -> None:
        if self.json_mode:
            self._emit("log", message=message)
        else:
            self._say(message)

    def result(self, fields: dict, text: Optional[str] = None) -> None:
        """The command's outcome: `fields` as a JSON event, or `text` on stdout for a person."""
        if self.json_mode:
            self._emit("result", **fields)
        elif text is not None:
            self._end_bar()
            self._out.write(text + "\n")
            self._out.flush()

    def error(self, message: str) -> None:
        if self.json_mode:
            self._emit("error", message=message)
        else:
            self._say(f"error: {message}")
