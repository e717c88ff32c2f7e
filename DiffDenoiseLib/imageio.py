"""Images in and out: an `Image` (numpy array + geometry + modality) read and written with SimpleITK.

Reading accepts every single file SimpleITK reads (NRRD, NIfTI, MHA/MHD, one DICOM file) and
DICOM series folders, and refuses, with one clear sentence, what a denoiser cannot use.
Writing is atomic: a file with the final name is always complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

MODALITY_TAG = "0008|0060"
CT_AIR_THRESHOLD = -500.0  # below this, intensities are Hounsfield units of air: a CT


@dataclass
class Image:
    """Voxels in SimpleITK's numpy order ((z, y, x) or (y, x)), geometry in its (x, y, z) order.

    The array keeps the file's dtype; geometry left as None is the identity for the array's dimension.
    """

    array: np.ndarray
    spacing: Optional[Tuple[float, ...]] = None
    origin: Optional[Tuple[float, ...]] = None
    direction: Optional[Tuple[float, ...]] = None
    modality: Optional[str] = None

    def __post_init__(self):
        n = np.ndim(self.array)
        self.spacing = tuple(float(v) for v in (self.spacing if self.spacing is not None else (1.0,) * n))
        self.origin = tuple(float(v) for v in (self.origin if self.origin is not None else (0.0,) * n))
        identity = np.eye(n).ravel()
        self.direction = tuple(float(v) for v in (self.direction if self.direction is not None else identity))
        if len(self.spacing) != n or len(self.origin) != n or len(self.direction) != n * n:
            raise ValueError(f"the geometry (spacing {self.spacing}, origin {self.origin}, direction "
                             f"{self.direction}) does not fit a {n}D array")


def is_2d(image: Image) -> bool:
    """True for a 2D image or a volume of a single slice."""
    return image.array.ndim == 2 or (image.array.ndim == 3 and image.array.shape[0] == 1)


def image_from_sitk(itk_image: sitk.Image, modality: Optional[str] = None) -> Image:
    """An Image from a SimpleITK image (array copied, geometry kept)."""
    return Image(array=sitk.GetArrayFromImage(itk_image), spacing=itk_image.GetSpacing(),
                 origin=itk_image.GetOrigin(), direction=itk_image.GetDirection(), modality=modality)


def image_to_sitk(image: Image, dtype=None) -> sitk.Image:
    """A SimpleITK image with the Image's geometry (and modality as DICOM tag metadata)."""
    array = np.asarray(image.array) if dtype is None else np.asarray(image.array, dtype=dtype)
    itk_image = sitk.GetImageFromArray(array, isVector=False)
    itk_image.SetSpacing(image.spacing)
    itk_image.SetOrigin(image.origin)
    itk_image.SetDirection(image.direction)
    if image.modality:
        itk_image.SetMetaData(MODALITY_TAG, image.modality)
    return itk_image


def read_image(path) -> Image:
    """Read an image file or a DICOM series folder (the series with the most files); the input is never modified."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        itk_image, modality = _read_dicom_series(path)
    else:
        itk_image, modality = _read_file(path)
    image = image_from_sitk(itk_image)
    bad = int(np.size(image.array) - np.count_nonzero(np.isfinite(image.array)))
    if bad:
        raise ValueError(f"{path} has {bad} NaN or infinite voxels; fill or mask them before denoising")
    image.modality = modality or modality_from_voxels(image.array)
    return image


def modality_from_voxels(array) -> Optional[str]:
    """"CT" when some voxel lies below CT_AIR_THRESHOLD (Hounsfield units of air), else None: the modality of an
    image whose file does not say (the volumes Slicer hands the worker)."""
    return "CT" if np.size(array) and float(np.min(array)) < CT_AIR_THRESHOLD else None


def _check_shape(path: Path, dimension: int, size, components: int) -> None:
    if components > 1:
        raise ValueError(f"{path} is a colour or vector image ({components} components per voxel); "
                         f"DiffDenoise takes grey-scale images")
    if dimension > 3:
        raise ValueError(f"{path} is a {dimension}D image (size {tuple(size)}); DiffDenoise takes 2D images "
                         f"and 3D volumes")
    if dimension < 2 or sum(s > 1 for s in size) < 2:
        raise ValueError(f"{path} is a 1D image (size {tuple(size)}); DiffDenoise takes 2D images and 3D volumes")


def _read_file(path: Path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise ValueError(f"{path} is not an image SimpleITK can read (NRRD, NIfTI, MHA/MHD, DICOM, ...)") from None
    _check_shape(path, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents())
    try:
        itk_image = reader.Execute()
    except RuntimeError as error:
        raise ValueError(f"{path} is not an image SimpleITK can read: {str(error).strip().splitlines()[-1]}") \
            from None
    modality = itk_image.GetMetaData(MODALITY_TAG).strip() if itk_image.HasMetaDataKey(MODALITY_TAG) else None
    return itk_image, modality or None


def _read_dicom_series(folder: Path):
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ValueError(f"{folder} is a folder without a DICOM series; give an image file or a DICOM folder")
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s) for s in series), key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        itk_image = reader.Execute()
    except RuntimeError:
        raise ValueError(f"{folder} holds a DICOM series that is not an image SimpleITK can read") from None
    _check_shape(folder, itk_image.GetDimension(), itk_image.GetSize(), itk_image.GetNumberOfComponentsPerPixel())
    modality = reader.GetMetaData(0, MODALITY_TAG).strip() if reader.HasMetaDataKey(0, MODALITY_TAG) else None
    return itk_image, modality or None


def _extension(name: str) -> str:
    return ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix


def write_image(image: Image, path) -> None:
    """Write float32 voxels with the image's geometry, atomically.

    SimpleITK picks the writer from the extension, and some formats write companion files
    (.mhd + .raw), so the image is written under its final name inside a temporary folder next
    to the target, then each file is renamed into place, the named file last.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"the output folder {folder} does not exist")
    if not _extension(path.name):
        raise ValueError(f"{path} has no file extension to choose the format by (.nrrd, .nii.gz, .mha, ...)")
    itk_image = image_to_sitk(image, dtype=np.float32)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=str(folder)))
    try:
        sitk.WriteImage(itk_image, str(staging / path.name), useCompression=True)
        written = sorted(staging.iterdir(), key=lambda p: p.name == path.name)
        for item in written:
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
