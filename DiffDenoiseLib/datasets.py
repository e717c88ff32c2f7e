"""Real images that install offline from Debian and PyPI packages, each as an `Image` with its true geometry.

They give tests and benchmarks real anatomy and real scanner noise without downloading
anything at run time; a missing package is named in the error so it can be installed.
"""

from __future__ import annotations

import importlib.util
import plistlib
import tarfile
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk

from DiffDenoiseLib.imageio import Image, read_image
from DiffDenoiseLib.normalization import raise_padding

COLIN27_PATH = Path("/usr/share/mricron/templates/ch2.nii.gz")
INVESALIUS_PATH = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm")           # bundled with the pydicom wheel
PYDICOM_DATA_FILES = ("693_UNCR.dcm", "MR2_UNCR.dcm", "RG1_UNCR.dcm")  # from the pydicom-data wheel


def colin27() -> Image:
    """Colin27 T1 brain MRI (27 scans averaged, nearly noise-free), 181x217x181 at 1 mm, uint8."""
    if not COLIN27_PATH.is_file():
        raise FileNotFoundError(f"Colin27 ({COLIN27_PATH}) is missing: install the Debian package mricron-data")
    image = read_image(COLIN27_PATH)
    image.modality = "MR"
    return image


def invesalius_head_ct() -> Image:
    """Head CT from InVesalius' example project: int16 HU, 108 slices of 256x256, 0.957 x 0.957 x 1.5 mm.

    The .inv3 project is a gzipped tar; main.plist gives the voxel type, shape, spacing and
    modality of matrix.dat, the raw volume.
    """
    if not INVESALIUS_PATH.is_file():
        raise FileNotFoundError(f"the InVesalius head CT ({INVESALIUS_PATH}) is missing: install the Debian "
                                f"package invesalius-examples")
    with tarfile.open(INVESALIUS_PATH, "r:gz") as archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
        info = plistlib.loads(archive.extractfile(members["main.plist"]).read())
        matrix = info["matrix"]
        raw = archive.extractfile(members[matrix["filename"]]).read()
    array = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]).newbyteorder("<")).reshape(matrix["shape"])
    return Image(array=array.astype(matrix["dtype"]), spacing=tuple(info["spacing"]), modality=info.get("modality"))


def pydicom_file(name: str) -> Image:
    """A DICOM test file from pydicom or pydicom-data, read as an Image (see `pydicom_path`).

    RG1_UNCR.dcm records no pixel spacing (0\\0), so it reads with SimpleITK's default of 1 mm.
    """
    return read_image(pydicom_path(name))


def pydicom_path(name: str) -> Path:
    """Where a DICOM test file from pydicom (CT_small.dcm, MR_small.dcm) or pydicom-data (693_UNCR.dcm head CT,
    MR2_UNCR.dcm shoulder MRI, RG1_UNCR.dcm chest X-ray, ...) is installed; never downloaded."""
    folders = []
    for package, sub in (("pydicom", ("data", "test_files")), ("data_store", ("data",))):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            folders.append(Path(spec.origin).parent.joinpath(*sub))
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    wheel = "pydicom" if name in PYDICOM_FILES else "pydicom-data"
    raise FileNotFoundError(f"the DICOM test file {name} is not installed: pip install {wheel} "
                            f"(known files: {', '.join(PYDICOM_FILES + PYDICOM_DATA_FILES)})")


def foreground_mask(image: Union[Image, np.ndarray]) -> np.ndarray:
    """Body (or object) voxels: Otsu threshold, in-plane closing, holes filled slice by slice.

    Metrics inside it ignore the air around the patient, which dominates whole-image PSNR.
    Padding outside a CT's field of view (one value far below air, e.g. -3024 HU) is first
    raised to the lowest real intensity, so that Otsu separates air from the body, not padding from air
    (the image's minimum, whatever its gap to the rest: a background of zeros rises to its lowest noise).
    """
    array = np.asarray(image.array if isinstance(image, Image) else image)
    array = raise_padding(array, array == array.min()).astype(np.float32)
    mask = sitk.OtsuThreshold(sitk.GetImageFromArray(array), 0, 1, 256)
    radius = [2, 2] + ([0] if array.ndim == 3 else [])
    mask = sitk.BinaryMorphologicalClosing(mask, radius, sitk.sitkBall, 1)
    if array.ndim == 2:
        return sitk.GetArrayFromImage(sitk.BinaryFillhole(mask)).astype(bool)
    slices = [sitk.GetArrayFromImage(sitk.BinaryFillhole(mask[:, :, z])) for z in range(mask.GetDepth())]
    return np.stack(slices).astype(bool)
