"""Progress reports and cooperative cancellation shared by training and denoising."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class Progress:
    """One progress report: `step` of `total` done in `stage`; `loss` for training stages."""

    stage: str
    step: int
    total: int
    loss: Optional[float]
    eta_s: Optional[float]
    resumed: bool = False


class Cancelled(Exception):
    """Raised when work stops because it was asked to (training saves a checkpoint first)."""


class CancelToken:
    """Set by the user (Cancel button, SIGTERM) or by the appearance of a stop file."""

    def __init__(self, stop_file: Optional[Path] = None):
        self.stop_file = Path(stop_file) if stop_file else None
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        if not self._event.is_set() and self.stop_file is not None and self.stop_file.exists():
            self._event.set()
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled("cancelled")


class ProgressTimer:
    """Counts work done and estimates the time left from the rate since `start`."""

    def __init__(self, total: int, done: int = 0):
        self.total = total
        self.done = done
        self._first_done = done
        self._started = time.monotonic()

    def advance(self, count: int = 1) -> None:
        self.done += count

    def eta_s(self) -> Optional[float]:
        worked = self.done - self._first_done
        if worked <= 0:
            return None
        rate = (time.monotonic() - self._started) / worked
        return max(0.0, rate * (self.total - self.done))
