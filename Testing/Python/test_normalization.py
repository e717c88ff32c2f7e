"""Normalisation back to the input's units, and the padding outside a scan's field of view."""

import numpy as np
import pytest

from DiffDenoiseLib.normalization import Normalization, padding_mask, raise_padding


def ct_with_padding(rng=np.random.default_rng(0)):
    """A 96 x 96 CT slice: noisy air (-1000 HU) and tissue (40 HU) inside the reconstructed circle, -3024 outside."""
    yy, xx = np.mgrid[:96, :96] - 47.5
    hu = np.where(np.hypot(yy, xx) < 30, 40.0, -1000.0) + rng.normal(0, 10, (96, 96))
    outside = np.hypot(yy, xx) > 46
    hu[outside] = -3024.0
    return hu, outside


def test_ct_padding_far_below_air_is_found_and_raised_to_air_without_touching_the_input():
    hu, outside = ct_with_padding()
    before = hu.copy()
    np.testing.assert_array_equal(padding_mask(hu), outside)
    raised = raise_padding(hu, padding_mask(hu))
    assert np.array_equal(hu, before) and raised.dtype == np.float64
    assert raised[outside].min() == raised.min() == hu[~outside].min()
    np.testing.assert_array_equal(raised[~outside], hu[~outside])
    # the range is the scan's, not the padding's: tissue keeps its place in [0, 1]
    assert Normalization.fit(raised).offset > -1100 and Normalization.fit(hu).offset == -3024


@pytest.mark.parametrize("name, array", [
    ("an MR background of zeros next to its noise", np.concatenate([np.zeros(500), np.arange(7.0, 200.0)])),
    ("a minimum that is one noisy voxel among many", np.random.default_rng(1).normal(0, 1, 1000)),
    ("air already at the minimum a scanner clips to", np.concatenate([np.full(300, -1024.0), np.arange(-1023, 1400.0)])),
    ("two values only", np.repeat([0.0, 1.0], 50)),
    ("one value", np.full(10, 5.0)),
])
def test_no_padding_is_found_where_the_minimum_lies_next_to_the_rest(name, array):
    assert padding_mask(array) is None, name
    np.testing.assert_array_equal(raise_padding(array, None), array)
