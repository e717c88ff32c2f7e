"""Reading and writing images: geometry round trips for every format, DICOM series, and clear refusals."""

import os
import time

import numpy as np
import pytest
import SimpleITK as sitk

from DiffDenoiseLib.imageio import Image, image_from_sitk, image_to_sitk, is_2d, read_image, write_image

DIRECTION = tuple(np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).ravel())


def volume(dtype=np.float32, low=0.0):
    array = (np.random.default_rng(0).random((5, 12, 9)) * 400 + low).astype(dtype)
    return Image(array=array, spacing=(0.7, 0.8, 2.5), origin=(-10.0, 20.0, 30.5), direction=DIRECTION)


def assert_same_geometry(a: Image, b: Image):
    assert a.array.shape == b.array.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-5)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-4)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


@pytest.mark.parametrize("name", ["v.nrrd", "v.nii.gz", "v.mha", "v.mhd"])
def test_round_trip_keeps_voxels_and_geometry(tmp_path, name):
    image = volume()
    write_image(image, tmp_path / name)
    again = read_image(tmp_path / name)
    assert_same_geometry(image, again)
    assert again.array.dtype == np.float32
    np.testing.assert_array_equal(again.array, image.array)
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p], "temporary files are cleaned up"


def test_2d_round_trip_and_is_2d(tmp_path):
    image = Image(array=np.arange(35, dtype=np.float32).reshape(5, 7), spacing=(0.5, 0.25), origin=(1.0, 2.0))
    write_image(image, tmp_path / "slice.mha")
    again = read_image(tmp_path / "slice.mha")
    assert again.array.shape == (5, 7) and again.spacing == (0.5, 0.25) and again.origin == (1.0, 2.0)
    assert again.direction == (1.0, 0.0, 0.0, 1.0)
    assert is_2d(again) and is_2d(Image(array=np.zeros((1, 5, 7)))) and not is_2d(volume())


def test_modality_is_kept_in_nrrd_and_guessed_from_hounsfield_units(tmp_path):
    ct = volume(low=-1024.0)
    write_image(ct, tmp_path / "ct.nii.gz")  # NIfTI keeps no modality: guessed from air at -1024
    assert read_image(tmp_path / "ct.nii.gz").modality == "CT"
    mr = volume()
    mr.modality = "MR"
    write_image(mr, tmp_path / "mr.nrrd")
    assert read_image(tmp_path / "mr.nrrd").modality == "MR"
    write_image(volume(), tmp_path / "plain.nii.gz")
    assert read_image(tmp_path / "plain.nii.gz").modality is None


def position(itk_image, i):
    return itk_image.TransformIndexToPhysicalPoint((0, 0, i))


def test_dicom_series_folder_is_read_with_geometry_and_modality(tmp_path):
    image = volume(dtype=np.int16, low=-1000.0)
    itk_image = image_to_sitk(image)
    # columns of the direction matrix: the row and column directions of each slice
    uid = "1.2.826.0.1.3680043.2.1125.1.%d" % int(time.time())
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(itk_image.GetDepth()):
        slice_ = itk_image[:, :, i]
        for tag, value in [("0008|0060", "CT"), ("0020|000e", uid), ("0020|000d", uid + ".0"),
                           ("0008|0018", f"{uid}.{i + 1}"), ("0020|0013", str(i + 1)),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in position(itk_image, i))),
                           ("0020|0037", "\\".join(f"{v:.6f}" for v in DIRECTION[0::3] + DIRECTION[1::3])),
                           ("0018|0050", "2.5")]:
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{i:03d}.dcm"))
        writer.Execute(slice_)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir())
    again = read_image(tmp_path)
    assert_same_geometry(image, again)
    np.testing.assert_array_equal(again.array, image.array)
    assert again.modality == "CT"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()) == before


def test_sitk_helpers_round_trip():
    image = volume()
    again = image_from_sitk(image_to_sitk(image), modality="MR")
    assert_same_geometry(image, again) and again.modality == "MR"
    with pytest.raises(ValueError, match="does not fit a 3D array"):
        Image(array=np.zeros((2, 3, 4)), spacing=(1.0, 1.0))


def test_missing_and_unreadable_inputs_are_refused_with_their_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.nrrd does not exist"):
        read_image(tmp_path / "nowhere.nrrd")
    (tmp_path / "empty.nrrd").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.nrrd is not an image SimpleITK can read"):
        read_image(tmp_path / "empty.nrrd")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt is not an image SimpleITK can read"):
        read_image(tmp_path / "notes.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="without a DICOM series"):
        read_image(tmp_path / "folder")


def test_colour_1d_4d_and_non_finite_images_are_refused(tmp_path):
    rgb = sitk.GetImageFromArray(np.zeros((8, 8, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(ValueError, match="colour or vector image .3 components"):
        read_image(tmp_path / "rgb.mha")
    sitk.WriteImage(sitk.Image([4, 5, 6, 2], sitk.sitkFloat32), str(tmp_path / "four.nrrd"))
    with pytest.raises(ValueError, match="is a 4D image"):
        read_image(tmp_path / "four.nrrd")
    (tmp_path / "line.nrrd").write_text("NRRD0004\ntype: float\ndimension: 1\nsizes: 5\nencoding: ascii\n\n1 2 3 4 5\n")
    with pytest.raises(ValueError, match="is a 1D image"):
        read_image(tmp_path / "line.nrrd")
    sitk.WriteImage(sitk.Image([9, 1], sitk.sitkFloat32), str(tmp_path / "row.mha"))
    with pytest.raises(ValueError, match="is a 1D image"):
        read_image(tmp_path / "row.mha")
    bad = np.ones((4, 6, 6), np.float32)
    bad[0, 0, :3] = np.nan
    bad[1, 1, 1] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(bad), str(tmp_path / "nan.nrrd"))
    with pytest.raises(ValueError, match="has 4 NaN or infinite voxels"):
        read_image(tmp_path / "nan.nrrd")


def test_writing_is_atomic_and_needs_an_existing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        write_image(volume(), tmp_path / "missing" / "out.nrrd")
    target = tmp_path / "out.nrrd"
    target.write_text("old")
    write_image(volume(), target)  # replaces the old file in one rename
    np.testing.assert_array_equal(read_image(target).array, volume().array)
    assert sorted(os.listdir(tmp_path)) == ["out.nrrd"]
