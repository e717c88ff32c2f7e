"""Files that appear only when complete.

A reader (Slicer loading a result, a resumed training reading its checkpoint) must
never see half a file, and an interrupted write must not leave debris behind. Every
single-file output is written to a hidden sibling first and renamed over the target
in one step (`os.replace` is atomic within a folder).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


@contextmanager
def replaced_when_done(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it becomes `path` only if the block finishes.

    The temporary name keeps the target's suffix, so writers that choose a format by
    extension (SimpleITK, numpy's savez) write the right one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
