"""Clean reference images and the synthetic noise suite of the benchmark.

Every image is mapped linearly to [0, 1] (0.5 / 99.5 percentiles, clipped) so that the
noise levels of the paper mean the same on CT, MR and X-ray; `Case.to_units` maps back
to the scanner's units (HU for CT) for the denoisers that take real images and for the
flat-region bias. Test crops, the slabs around them (for BM4D and 2.5D models) and the
training regions (peer tuning and the supervised oracle) never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

from DiffDenoiseLib import datasets
from DiffDenoiseLib.noise import add_noise, gaussian_kernel
from DiffDenoiseLib.normalization import raise_padding

CORRELATED_SIGMA = 0.1  # std of the correlated noise (add_noise's default), so only the correlation varies
STD_FLOOR_INTENSITY = 0.01  # where signal-dependent noise vanishes (black), its std is read at this intensity


@dataclass(frozen=True)
class Noise:
    """One setting of the suite: `kind` and `level` as `DiffDenoiseLib.noise.add_noise` takes them."""

    kind: str
    level: float
    label: str
    mr_only: bool = False

    def apply(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return add_noise(clean, self.kind, self.level, rng, sigma=CORRELATED_SIGMA)

    def antithetic(self, clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
        """The same draw of noise with its sign flipped, 2 clean - noisy. A method's outputs on the two average away
        every part of its result that is odd in the noise, which is most of what one draw's patch mean moves, and
        keep its bias. The noise's mean and variance at each voxel are kept; Poisson and Gamma noise's small skew
        (0.1 and 0.2 in brain tissue at lambda 200 and alpha 100) is flipped; a Rician draw is no Rician draw."""
        if self.kind == "rician":
            raise ValueError("a Rician draw has no antithetic twin: its magnitude is not clean plus noise")
        return 2.0 * np.asarray(clean, dtype=np.float64) - noisy

    def std(self, clean: np.ndarray) -> np.ndarray:
        """The noise's standard deviation at each voxel of `clean` (Rician: its Gaussian parts' sigma). Poisson
        and Gamma noise vanish where the image is 0; they are taken there as at STD_FLOOR_INTENSITY."""
        x = np.maximum(np.asarray(clean, dtype=np.float64), STD_FLOOR_INTENSITY)
        if self.kind == "poisson":
            return np.sqrt(x / self.level)
        if self.kind == "gamma":
            return x / np.sqrt(self.level)
        return np.full(x.shape, CORRELATED_SIGMA if self.kind == "correlated" else self.level)


NOISES = (
    Noise("gaussian", 6 / 255, "gaussian 6/255"),
    Noise("gaussian", 25 / 255, "gaussian 25/255"),
    Noise("poisson", 200, "poisson 200"),
    Noise("poisson", 700, "poisson 700"),
    Noise("gamma", 100, "gamma 100"),
    Noise("gamma", 500, "gamma 500"),
    Noise("correlated", 0.5, "correlated 0.5"),
    Noise("correlated", 1.2, "correlated 1.2"),
    Noise("rician", 0.05, "rician 0.05", mr_only=True),
)
# In this order: a noise's place in the modality's list seeds its draws, so settings added later come last and
# leave the earlier ones' draws as they were.
QUICK_NOISES = ("gaussian 6/255", "gaussian 25/255", "poisson 200", "gamma 100", "correlated 1.2", "rician 0.05",
                "correlated 0.5")


def noises_for(modality: str, quick: bool) -> List[Noise]:
    chosen = [n for label in QUICK_NOISES for n in NOISES if n.label == label] if quick else list(NOISES)
    return [n for n in chosen if modality == "MR" or not n.mr_only]


def correlated_psd(shape: Tuple[int, ...], kernel_sigma: float, sigma: float = CORRELATED_SIGMA) -> np.ndarray:
    """Power spectrum of `add_noise(..., 'correlated')` in the convention of the bm3d/bm4d packages.

    The noise is white noise through the unit-energy kernel outer(g, g) / sum(g^2), per slice;
    bm3d wants |FFT(kernel)|^2 * (number of voxels) * variance. Slices are independent, so a 3D
    spectrum is the 2D one repeated along z.
    """
    g = gaussian_kernel(kernel_sigma)
    kernel = np.outer(g, g) / np.sum(g ** 2)
    psd = np.abs(np.fft.fft2(kernel, s=shape[-2:])) ** 2 * shape[-1] * shape[-2] * sigma ** 2
    if len(shape) == 3:
        psd = np.repeat(psd[None], shape[0], axis=0) * shape[0]
    return psd


@dataclass
class Case:
    """One reference image: clean test slices, slabs around them, training regions, and its units."""

    name: str
    modality: str
    unit: str
    offset: float
    scale: float
    clean: np.ndarray  # (n, H, W) test crops in [0, 1]
    slabs: Optional[np.ndarray]  # (n, D, H, W) with the test slice at D // 2, or None for a 2D image
    train: List[np.ndarray] = field(default_factory=list)  # 2D regions in [0, 1], disjoint from the test crops
    # (D, H, W) slabs around a volume's training regions, laid out as `slabs`; None for a 2D image
    train_slabs: Optional[List[np.ndarray]] = None
    source: str = ""
    # (n, H, W) body masks of the test crops, cut from the whole slice's mask: inside a crop with no air,
    # Otsu would split bone from soft tissue instead of the body from the air
    body: Optional[np.ndarray] = None

    def to_units(self, normalised: np.ndarray) -> np.ndarray:
        return np.asarray(normalised, dtype=np.float64) * self.scale + self.offset


def without_padding(array: np.ndarray) -> np.ndarray:
    """CT padding outside the field of view (one value far below air, e.g. -3024 HU) raised to the lowest real
    intensity, as `datasets.foreground_mask` does, so it neither stretches the [0, 1] scale nor smears when
    downsampled. Every image's minimum counts (Colin27's background of zeros is raised to 7), as since the first
    run; the pipeline's own rule (`normalization.padding_mask`) also asks for a gap, which only CT padding has."""
    return raise_padding(array, np.asarray(array) == np.min(array))


def normaliser(array: np.ndarray) -> Tuple[float, float]:
    low, high = np.percentile(array, [0.5, 99.5])
    return float(low), float(high - low)


def to_unit(array: np.ndarray, offset: float, scale: float) -> np.ndarray:
    return np.clip((np.asarray(array, dtype=np.float64) - offset) / scale, 0.0, 1.0)


def crop_box(mask2d: np.ndarray, size: int) -> Tuple[slice, slice]:
    """A size x size window centred on the foreground's bounding box, inside the image."""
    ys, xs = np.nonzero(mask2d) if mask2d.any() else np.indices(mask2d.shape).reshape(2, -1)
    box = []
    for centre, length in ((int(ys.min() + ys.max()) // 2, mask2d.shape[0]),
                           (int(xs.min() + xs.max()) // 2, mask2d.shape[1])):
        side = min(size, length)
        start = int(np.clip(centre - side // 2, 0, length - side))
        box.append(slice(start, start + side))
    return box[0], box[1]


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Downsample a 2D image by averaging factor x factor blocks (also averages away its own noise)."""
    if factor <= 1:
        return np.asarray(image, dtype=np.float64)
    h, w = (s // factor * factor for s in image.shape)
    return image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def volume_case(name: str, image, unit: str, crop: int, tests: int, trains: int, slab: int, source: str) -> Case:
    """Axial test slices from the middle of a clean volume; training slices keep clear of their slabs."""
    array = without_padding(image.array)
    offset, scale = normaliser(array)
    unit_volume = to_unit(array, offset, scale)
    n = array.shape[0]
    middle = np.arange(int(0.3 * n), int(0.7 * n))
    test_idx = middle[np.linspace(0, len(middle) - 1, tests + 2).round().astype(int)[1:-1]]
    half = slab // 2
    clean, slabs, train, train_slabs, body = [], [], [], [], []
    for i in test_idx:
        mask = datasets.foreground_mask(array[i])
        ys, xs = crop_box(mask, crop)
        body.append(mask[ys, xs])
        clean.append(unit_volume[i, ys, xs])
        slabs.append(unit_volume[i - half:i - half + slab, ys, xs])  # test slices lie far from the ends
    far = [j for j in range(int(0.2 * n), int(0.8 * n)) if all(abs(j - i) > half + 2 for i in test_idx)]
    for j in np.asarray(far)[np.linspace(0, len(far) - 1, trains).round().astype(int)]:
        ys, xs = crop_box(datasets.foreground_mask(array[j]), crop)
        train.append(unit_volume[j, ys, xs])
        train_slabs.append(unit_volume[j - half:j - half + slab, ys, xs])
    return Case(name, image.modality or "MR", unit, offset, scale, np.stack(clean), np.stack(slabs), train,
                train_slabs, source, np.stack(body))


def image_case(name: str, image, unit: str, crop: int, source: str) -> Case:
    """One 2D image: downsampled so its short side is about twice the crop, a centre crop for the test,
    the strips around the crop for training."""
    array = without_padding(image.array)
    array = array[0] if array.ndim == 3 else array
    array = block_mean(array, max(1, min(array.shape) // (2 * crop)))
    offset, scale = normaliser(array)
    unit_image = to_unit(array, offset, scale)
    mask = datasets.foreground_mask(array)
    ys, xs = crop_box(mask, crop)
    regions = [unit_image[:ys.start], unit_image[ys.stop:], unit_image[ys, :xs.start], unit_image[ys, xs.stop:]]
    train = [r for r in regions if min(r.shape) >= 32]
    return Case(name, image.modality or "OT", unit, offset, scale, unit_image[ys, xs][None], None, train, None,
                source, mask[ys, xs][None])


def build_cases(quick: bool) -> Tuple[List[Case], List[str]]:
    """The benchmark's images; a missing data package is reported, not fatal."""
    crop = 128 if quick else 192
    tests = 1 if quick else 3
    trains = 4 if quick else 12
    makers: List[Tuple[str, Callable[[], Case]]] = [
        ("colin27-t1", lambda: volume_case("colin27-t1", datasets.colin27(), "a.u.", crop, tests, trains, 8,
                                           "Colin27 T1 (Debian mricron-data), axial")),
        ("invesalius-head-ct", lambda: volume_case("invesalius-head-ct", datasets.invesalius_head_ct(), "HU", crop,
                                                   tests, trains, 8, "InVesalius head CT (Debian invesalius-examples)")),
        ("693-head-ct", lambda: image_case("693-head-ct", datasets.pydicom_file("693_UNCR.dcm"), "HU", crop,
                                           "pydicom-data 693_UNCR.dcm head CT")),
        ("mr2-shoulder-mr", lambda: image_case("mr2-shoulder-mr", datasets.pydicom_file("MR2_UNCR.dcm"), "a.u.", crop,
                                               "pydicom-data MR2_UNCR.dcm shoulder MRI")),
        ("rg1-chest-xray", lambda: image_case("rg1-chest-xray", datasets.pydicom_file("RG1_UNCR.dcm"), "a.u.", crop,
                                              "pydicom-data RG1_UNCR.dcm chest radiograph")),
    ]
    cases, missing = [], []
    for name, make in makers:
        try:
            cases.append(make())
        except FileNotFoundError as error:
            missing.append(f"{name}: {error}")
    return cases, missing
