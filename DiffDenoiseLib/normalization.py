"""Linear intensity normalisation to roughly [0, 1], kept so outputs return to the input's units exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5


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
