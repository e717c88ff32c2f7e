"""How many times a 2D image's Wiener step weighs the noise, chosen per image.

The Wiener step's pilot keeps some of y's noise in its groups' deviations, so weighing the noise more than once helps
where the image is flat (a head CT's soft tissue) and costs fine texture (a chest radiograph's lung). No one weight
suits both, so each image's is chosen by Recorrupted-to-Recorrupted (Pang, Zheng, Quan and Ji, CVPR 2021): with z
drawn as the noise, y + alpha z and y - z / alpha carry noise uncorrelated with each other (independent when it is
Gaussian), so the mean squared distance from the filters' result on the first to the second ranks the weights as the
error from the clean image would, at the first's noise, (1 + alpha^2) times y's. The whole chain is rerun on the
first (network, hard thresholding, Wiener step), as its pilot must follow the first's noise as it follows y's; the
noise's curve is y's, times 1 + alpha^2. Measured (2026-12-07, the three 2D images' test crops and 3 held-out regions,
Gaussian 25/255 and Poisson 200, Full's groups, one weight per image and noise over its 4 regions) against
WIENER_2D_NOISE_SCALE = 1.7 for all: the 693 head CT +0.04 and +0.14 dB, the shoulder MRI +0.03 and 0.00, the chest
X-ray +0.14 and +0.06; each within 0.09 dB of the best weight in hindsight. Through the pipeline on the three images'
test crops alone (one draw, Gaussian 6 and 25/255, Poisson 200, Gamma 100): the CT +0.02 on average (-0.05 under
Poisson 200, whose crop wants 1.7), the MRI +0.02 (Fast) and +0.04 (Full), the X-ray +0.05 and +0.10. The weights
stop at 2.2: with 2.8 the pick went there on the CT (the louder first image's best lies a little higher than y's)
and lost 0.12 under Poisson 200. Choosing on Fast's shallower groups for Full's image picked higher on the MRI.
The network is rerun on the first image: with y's result held, the picks missed the best weight of the CT's
Poisson 200 regions by 0.45 dB on average.
"""
import zlib
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from DiffDenoiseLib.noise import Curve
from DiffDenoiseLib.wiener import collaborative_wiener

NOISE_SCALES = (1.0, 1.3, 1.7, 2.2)  # the weights tried
RECORRUPTION = 0.5  # alpha: the first image's noise 1.25 times y's variance
PROBES = 2  # draws of z, their distances summed
CROP = 128  # the side of the crops the weight is chosen on
CROPS = 4  # at most, spread over the middle slice


def probe_crops(shape: Tuple[int, int], crop: int = CROP, crops: int = CROPS) -> List[Tuple[slice, slice]]:
    """Up to `crops` windows of `crop` voxels a side (the whole side where shorter) centred on the quarters of an
    image of `shape` (rows, columns): the image's middle half, where its anatomy lies, rather than its corners."""
    def starts(length: int) -> List[int]:
        if length <= crop:
            return [0]
        return sorted({int(np.clip(round(length * q - crop / 2), 0, length - crop)) for q in (0.25, 0.75)})

    rows, cols = shape
    windows = [(slice(r, r + min(crop, rows)), slice(c, c + min(crop, cols)))
               for r in starts(rows) for c in starts(cols)]
    return windows[:crops]


def probe_pixels(shape: Tuple[int, int]) -> int:
    """How many pixels of an image of `shape` the probes filter: those of its `probe_crops`."""
    return sum((rows.stop - rows.start) * (cols.stop - cols.start) for rows, cols in probe_crops(shape))


def recorrupted_pair(y: np.ndarray, variance: np.ndarray, alpha: float,
                     rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """(y + alpha z, y - z / alpha), z Gaussian of `variance` at each voxel: their noises are uncorrelated."""
    z = rng.standard_normal(y.shape) * np.sqrt(variance)
    return y + alpha * z, y - z / alpha


def choose_noise_scale(slices: np.ndarray, curve: Curve, pilot_of: Callable[[np.ndarray, Curve], np.ndarray],
                       deep_groups: bool = True, device: Optional[torch.device] = None,
                       progress: Optional[Callable[[], None]] = None, scales: Sequence[float] = NOISE_SCALES,
                       probes: int = PROBES, alpha: float = RECORRUPTION) -> Tuple[float, np.ndarray]:
    """(the weight of `scales` whose Wiener step comes nearest, the mean squared distance of each) for the 2D slices
    (n, H, W) under white noise of `curve`, on `probe_crops` of the middle slice. `pilot_of(y, curve)` makes the
    Wiener step's pilot of crops (c, h, w) as the pipeline makes it (the network's result and hard thresholding);
    `progress` is called after each probe. The draws of z are seeded by the crops' values: the same image gets the
    same weight, and a synthetic image's noise cannot have been drawn with the same seed (a fixed seed of 0 was the
    benchmark's: z was then its noise, and every Gaussian row chose the largest weight). The input is not modified."""
    if probes < 1 or not alpha > 0 or not scales:
        raise ValueError(f"choosing the noise's weight needs probes >= 1, alpha > 0 and weights to try, got {probes}, "
                         f"{alpha} and {list(scales)}")
    middle = np.asarray(slices[len(slices) // 2], np.float64)
    y = np.stack([middle[window] for window in probe_crops(middle.shape)])
    variance = np.interp(y, *curve)
    louder = (np.asarray(curve[0]), np.asarray(curve[1]) * (1.0 + alpha ** 2))
    rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(y).tobytes()))
    distance = np.zeros(len(scales))
    for _ in range(probes):
        first, second = recorrupted_pair(y, variance, alpha, rng)
        filtered = collaborative_wiener(first, pilot_of(first, louder), louder, device=device, deep_groups=deep_groups,
                                        noise_scale=scales)  # (weights, crops, h, w): one matching for all
        distance += np.mean((filtered.reshape(len(scales), -1) - second.reshape(1, -1)) ** 2, axis=1) / probes
        if progress is not None:
            progress()
    return float(scales[int(np.argmin(distance))]), distance
