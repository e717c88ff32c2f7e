"""Cost of one call: wall seconds and peak extra memory.

tracemalloc would miss torch's CPU tensors, and getrusage only knows the process's
lifetime peak, so a thread samples the resident set size (Linux /proc/self/statm) every
few milliseconds while the call runs; the peak above the size before the call is reported.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Tuple, TypeVar

T = TypeVar("T")
STATM = Path("/proc/self/statm")
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> Optional[int]:
    try:
        return int(STATM.read_text().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


def measured(call: Callable[[], T], interval: float = 0.002) -> Tuple[T, float, Optional[float]]:
    """(result, seconds, peak extra resident MiB or None where it cannot be sampled)."""
    base = resident_bytes()
    peak = [base or 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes() or 0)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        result = call()
    finally:
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    peak[0] = max(peak[0], resident_bytes() or 0)
    return result, seconds, None if base is None else (peak[0] - base) / 2 ** 20
