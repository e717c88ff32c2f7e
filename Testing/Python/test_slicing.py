"""Slice axis, 2.5D stacks and tiled processing."""

import numpy as np
import pytest
import torch

from DiffDenoiseLib.slicing import (
    as_slice_stack,
    choose_slice_axis,
    context_stack,
    from_slice_stack,
    map_tiled,
    neighbour_indices,
)


def test_slice_axis_is_the_coarsest_spacing():
    # spacing (x, y, z); numpy shape (z, y, x)
    assert choose_slice_axis((0.9, 0.9, 3.0), (40, 256, 256)) == 0
    assert choose_slice_axis((3.0, 0.9, 0.9), (256, 256, 40)) == 2
    assert choose_slice_axis((1.0, 1.0, 1.0), (50, 60, 70)) == 0
    assert choose_slice_axis((0.5, 0.5), (64, 64)) == 0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_stack_round_trip(axis):
    volume = np.random.default_rng(0).random((5, 6, 7))
    stack = as_slice_stack(volume, axis)
    assert stack.shape[0] == volume.shape[axis]
    assert np.array_equal(from_slice_stack(stack, axis, 3), volume)


def test_neighbours_never_repeat_the_centre_slice():
    for n in (2, 3, 6):
        for i in range(n):
            idx = neighbour_indices(i, n, 1)
            assert idx[1] == i and i not in (idx[0], idx[2])
    volume = np.arange(4)[:, None, None] * np.ones((4, 2, 2))
    assert context_stack(volume, 0, 1)[:, 0, 0].tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="2.5D"):
        neighbour_indices(0, 1, 1)


def test_tiling_reproduces_pointwise_functions_exactly():
    x = torch.randn(2, 3, 300, 517)
    out = map_tiled(lambda t: t[:, 1:2] * 2 + 1, [x], tile=128, overlap=24)
    assert torch.allclose(out, x[:, 1:2] * 2 + 1, atol=1e-5)


def test_tiling_has_no_seams_for_a_convolution():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(1, 1, 5, padding=2)
    x = torch.randn(1, 1, 200, 260)
    with torch.no_grad():
        whole = conv(x)
        tiled = map_tiled(conv, [x], tile=96, overlap=16)
    # away from the image border the blended result matches the untiled one
    assert torch.allclose(tiled[..., 2:-2, 2:-2], whole[..., 2:-2, 2:-2], atol=1e-5)
