"""Linear intensity normalisation to roughly [0, 1], kept so outputs return to the input's units exactly, and the
padding outside a scan's field of view, which is no part of its intensities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
# Padding lies this share of the rest's intensity range (lowest real value to its 99.5th percentile) or more below the
# lowest real value. CT scanners fill the corners outside the reconstructed circle with one value far below air
# (-3024 or -2048 HU against air's -1024: 0.9 and 0.5 of a head CT's range), while an MR background of zeros lies
# next to its noise (Colin27: 0 and 7 of 188, 0.04; the shoulder MRI of pydicom-data 0.002).
PADDING_MIN_GAP = 0.25
PADDING_SAMPLE = 1_000_000  # voxels the rest's range is read on


def padding_mask(array) -> Optional[np.ndarray]:
    """The voxels of `array` outside the field of view, or None when it has none: those at its minimum, when that
    lies PADDING_MIN_GAP of the rest's range below every other value.

    Left in, padding stretches the normalised range: on the head CT slice of pydicom-data (21 % of it at -3024 HU)
    the shipped CT model's blind-spot estimate and Full's result, fed tissue squeezed into half the range it was
    trained on, moved the brain by -40 HU (Fast by +3.5); with the padding raised to air, by -1 to -2 HU (Fast +0.6
    to +1.0)."""
    data = np.asarray(array)
    if data.size == 0:
        return None
    lowest = data.min()
    padding = data == lowest
    floor = float(data.min(where=~padding, initial=np.inf))
    if not np.isfinite(floor):  # one value throughout
        return None
    flat = data.reshape(-1)
    sample = flat[::max(1, flat.size // PADDING_SAMPLE)]  # the rest's top, read without a copy of the whole rest
    top = float(np.percentile(sample[sample != lowest], HIGH_PERCENTILE)) if (sample != lowest).any() else floor
    if top <= floor or floor - float(lowest) < PADDING_MIN_GAP * (top - floor):
        return None
    return padding


def raise_padding(array, padding: Optional[np.ndarray]) -> np.ndarray:
    """A float64 copy of `array` with its `padding` voxels (a mask, or None for none) raised to the lowest real
    intensity (air on a CT), so that they neither stretch the range nor make an edge that filters would smear."""
    data = np.array(array, dtype=np.float64)
    if padding is not None and padding.any() and not padding.all():
        data[padding] = data[~padding].min()
    return data


@dataclass
class Normalization:
    """y = (a - offset) / scale; percentiles rather than min/max so a few outliers cannot squash the range."""

    offset: float
    scale: float

    @classmethod
    def fit(cls, array) -> "Normalization":
        data = np.asarray(array, dtype=np.float64)
        low, high = np.percentile(data, [LOW_PERCENTILE, HIGH_PERCENTILE])
        if high <= low:  # nearly all voxels equal: fall back on the full range
            low, high = float(data.min()), float(data.max())
        if high <= low:
            raise ValueError(f"the image is constant (every voxel is {low:g}): there is no noise to remove")
        return cls(offset=float(low), scale=float(high - low))

    def forward(self, array) -> np.ndarray:
        return (np.asarray(array, dtype=np.float64) - self.offset) / self.scale

    def inverse(self, array) -> np.ndarray:
        return np.asarray(array, dtype=np.float64) * self.scale + self.offset

    def to_dict(self) -> dict:
        return {"offset": self.offset, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(offset=float(d["offset"]), scale=float(d["scale"]))
