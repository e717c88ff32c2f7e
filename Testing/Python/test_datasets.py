"""Offline datasets: true shapes, spacings and intensities, clear messages when a package is missing."""

import numpy as np
import pytest

from DiffDenoiseLib import datasets
from DiffDenoiseLib.imageio import Image


def load_or_skip(loader, *args):
    try:
        return loader(*args)
    except FileNotFoundError as error:
        pytest.skip(str(error))


def test_colin27_is_a_1mm_t1_brain():
    image = load_or_skip(datasets.colin27)
    assert image.array.shape == (181, 217, 181) and image.spacing == (1.0, 1.0, 1.0)
    assert image.modality == "MR" and image.array.dtype == np.uint8
    mask = datasets.foreground_mask(image)
    assert 0.3 < mask.mean() < 0.7
    assert image.array[mask].mean() > 4 * image.array[~mask].mean()


@pytest.fixture(scope="module")
def head_ct():
    return load_or_skip(datasets.invesalius_head_ct)


def test_invesalius_ct_has_its_archive_geometry_and_hounsfield_units(head_ct):
    assert head_ct.array.shape == (108, 256, 256) and head_ct.array.dtype == np.int16
    np.testing.assert_allclose(head_ct.spacing, (0.957031, 0.957031, 1.5), atol=1e-6)
    assert head_ct.modality == "CT"
    assert head_ct.array.min() == -1024 and 2000 < head_ct.array.max() < 3100  # air floor and dense bone
    corners = head_ct.array[:, :8, :8]
    assert abs(float(np.median(corners)) + 1000) < 50, "air is near -1000 HU"


def test_foreground_mask_of_the_ct_holds_the_head_and_not_the_air(head_ct):
    mask = datasets.foreground_mask(head_ct)
    assert mask.shape == head_ct.array.shape and mask.dtype == bool
    assert 0.2 < mask.mean() < 0.6
    assert float(np.median(head_ct.array[mask])) > -100  # soft tissue, brain and bone
    assert float(np.median(head_ct.array[~mask])) < -900  # air
    assert not mask[:, :4, :4].any()
    assert mask[54, 128, 128], "the centre of the head is filled, not a hole"


@pytest.mark.parametrize("name,shape,spacing,modality", [
    ("CT_small.dcm", (1, 128, 128), (0.661468, 0.661468), "CT"),
    ("MR_small.dcm", (1, 64, 64), (0.3125, 0.3125), "MR"),
    ("693_UNCR.dcm", (1, 512, 512), (0.478516, 0.478516), "CT"),
    ("MR2_UNCR.dcm", (1, 1024, 1024), (0.195313, 0.195313), "MR"),
    ("RG1_UNCR.dcm", (1, 1955, 1841), (1.0, 1.0), "CR"),
])
def test_pydicom_files_are_read_with_their_pixel_spacing_and_modality(name, shape, spacing, modality):
    image = load_or_skip(datasets.pydicom_file, name)
    assert isinstance(image, Image) and image.array.shape == shape
    np.testing.assert_allclose(image.spacing[:2], spacing, atol=1e-6)
    assert image.modality == modality
    if name == "693_UNCR.dcm":
        head = datasets.foreground_mask(image.array[0])
        assert -1100 < float(np.median(image.array[0][~head])) < -900 < float(np.median(image.array[0][head]))


def test_missing_data_names_the_package_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "COLIN27_PATH", tmp_path / "ch2.nii.gz")
    monkeypatch.setattr(datasets, "INVESALIUS_PATH", tmp_path / "Cranium.inv3")
    with pytest.raises(FileNotFoundError, match="install the Debian package mricron-data"):
        datasets.colin27()
    with pytest.raises(FileNotFoundError, match="install the Debian package invesalius-examples"):
        datasets.invesalius_head_ct()
    with pytest.raises(FileNotFoundError, match="pip install pydicom-data"):
        datasets.pydicom_file("NOT_THERE.dcm")
