"""A before/after picture a person can open: input | denoised | what was removed, as one PNG.

The middle slice along the slice axis is shown with one intensity window for both
images (a soft-tissue window for CT, the input's 1st-99th percentiles otherwise), and
the removed part (input minus output) at +-3 noise standard deviations, so a reader
can see at once whether only noise was taken away or also anatomy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DiffDenoiseLib.atomic import replaced_when_done
from DiffDenoiseLib.slicing import as_slice_stack, choose_slice_axis

CT_WINDOW = (-160.0, 240.0)  # level 40 HU, width 400 HU
GAP = 4


def middle_slice(array: np.ndarray, spacing) -> np.ndarray:
    stack = as_slice_stack(array, choose_slice_axis(spacing, array.shape))
    return stack[stack.shape[0] // 2].astype(np.float64)


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return (np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def before_after_png(before, after, path, modality=None) -> Path:
    """Write the three-panel picture of two `Image`s with the same geometry; returns the path."""
    original = middle_slice(before.array, before.spacing)
    denoised = middle_slice(after.array, after.spacing)
    removed = original - denoised
    if modality == "CT":
        low, high = CT_WINDOW
    else:
        low, high = np.percentile(original, [1.0, 99.0])
    spread = 3.0 * float(np.std(removed)) or 1.0
    panels = [to_uint8(original, low, high), to_uint8(denoised, low, high), to_uint8(removed, -spread, spread)]
    height = panels[0].shape[0]
    gap = np.full((height, GAP), 255, dtype=np.uint8)
    picture = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    scale = max(1, int(np.ceil(384 / max(height, 1))))
    picture = np.kron(picture, np.ones((scale, scale), dtype=np.uint8))
    path = Path(path)
    with replaced_when_done(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(picture[::-1] if _flip_rows(before) else picture), str(tmp))
    return path


def _flip_rows(image) -> bool:
    """Show images the way viewers do: rows top to bottom as the direction's y axis points down (LPS)."""
    direction = np.asarray(image.direction, dtype=np.float64)
    dim = int(round(np.sqrt(direction.size)))
    return bool(dim >= 2 and direction.reshape(dim, dim)[1, 1] < 0)
