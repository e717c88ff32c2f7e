"""From volumes to network inputs and back: slice axis, 2.5D stacks, tiled processing.

The networks see 2D slices, optionally with `k` neighbouring slices on each side as
extra channels (2.5D). At the ends of a volume the neighbours are mirrored *without*
repeating the edge slice: a blind-spot network given a copy of the slice it denoises
as a "neighbour" would simply read the hidden pixel from it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch


def choose_slice_axis(spacing_xyz: Sequence[float], shape: Sequence[int]) -> int:
    """The numpy axis to slice along: the one with the coarsest spacing (the through-plane axis).

    `spacing_xyz` is in SimpleITK's (x, y, z) order, `shape` in numpy's (z, y, x).
    Isotropic volumes are sliced along numpy axis 0. 2D images have a single axis 0.
    """
    if len(shape) == 2:
        return 0
    spacing_zyx = list(spacing_xyz)[::-1]
    coarsest = max(spacing_zyx)
    if np.isclose(min(spacing_zyx), coarsest, rtol=1e-3):
        return 0
    return int(np.argmax(spacing_zyx))


def as_slice_stack(array: np.ndarray, axis: int) -> np.ndarray:
    """A (n_slices, H, W) view of a 2D image or a volume sliced along `axis`."""
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"expected a 2D image or a 3D volume, got {array.ndim} dimensions")
    return np.moveaxis(array, axis, 0)


def from_slice_stack(stack: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Inverse of `as_slice_stack`."""
    if ndim == 2:
        return stack[0]
    return np.moveaxis(stack, 0, axis)


def neighbour_indices(index: int, n_slices: int, context: int) -> list:
    """Indices of slices `index-k .. index+k`, mirrored at the ends without repeating the edge."""
    if context and n_slices <= context:
        raise ValueError(
            f"this model uses {context} neighbouring slice(s) on each side (2.5D) and needs at least "
            f"{context + 1} slices, but the image has {n_slices}; use a 2D model for single images"
        )
    out = []
    for j in range(index - context, index + context + 1):
        if j < 0:
            j = -j
        elif j >= n_slices:
            j = 2 * (n_slices - 1) - j
        out.append(j)
    return out


def context_stack(slices: np.ndarray, index: int, context: int) -> np.ndarray:
    """The (2k+1, H, W) network input for slice `index` of a (n, H, W) stack."""
    return slices[neighbour_indices(index, slices.shape[0], context)]


def blend_window(size: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """1D blending weights of one tile: zero on the outer quarter of each inner overlap, then a cosine ramp.

    The zero margin discards the pixels whose receptive field reached past the tile
    border, so a convolution whose radius is within a quarter of the overlap is
    reproduced exactly; the ramp hides any remaining difference between tiles.
    """
    w = np.ones(size, dtype=np.float64)
    margin = overlap // 4
    ramp_length = overlap - margin
    ramp = np.concatenate([np.zeros(margin), 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp_length) + 0.5) / ramp_length)])
    if not at_start and overlap:
        w[:overlap] = ramp
    if not at_end and overlap:
        w[size - overlap:] = ramp[::-1]
    return w


TILE = 256  # side of the tiles a larger slice goes through the networks in (pipeline.denoise_image's default)
TILE_OVERLAP = 64  # pixels neighbouring tiles share, blended across


def tile_starts(length: int, tile: int, overlap: int) -> list:
    """Start offsets of tiles of size `tile` covering `length` with at least `overlap` shared pixels."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tiled_pixels(height: int, width: int, tile: int = TILE, overlap: int = TILE_OVERLAP) -> int:
    """How many pixels a network evaluates for one height x width slice through `map_tiled`: overlapping tiles
    see some pixels twice or four times (2.25 times the slice's pixels at 512 x 512)."""
    return (len(tile_starts(height, tile, overlap)) * min(height, tile)
            * len(tile_starts(width, tile, overlap)) * min(width, tile))


def map_tiled(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    tile: int = TILE,
    overlap: int = TILE_OVERLAP,
) -> torch.Tensor:
    """Apply `fn(*tiles) -> (B, C, h, w)` over large slices in overlapping tiles, blended smoothly.

    All `inputs` are (B, *, H, W) and cut at the same places; slices no larger than
    `tile` go through in one call. The weights are normalised by their sum, so a
    pointwise `fn` is reproduced exactly, and there are no
    seams where a convolution sees the tile border (see `blend_window`).
    """
    height, width = inputs[0].shape[-2:]
    if height <= tile and width <= tile:
        return fn(*inputs)
    if overlap >= tile:
        raise ValueError("tile overlap must be smaller than the tile")
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out: Optional[torch.Tensor] = None
    weight_sum = torch.zeros((height, width), dtype=torch.float64)
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            th, tw = min(tile, height), min(tile, width)
            part = fn(*[t[..., y0:y0 + th, x0:x0 + tw] for t in inputs])
            wy = blend_window(th, min(overlap, th // 2), iy == 0, iy == len(ys) - 1)
            wx = blend_window(tw, min(overlap, tw // 2), ix == 0, ix == len(xs) - 1)
            weight = torch.from_numpy(np.outer(wy, wx))
            if out is None:
                out = torch.zeros(part.shape[:-2] + (height, width), dtype=torch.float64, device=part.device)
            out[..., y0:y0 + th, x0:x0 + tw] += part.double() * weight.to(part.device)
            weight_sum[y0:y0 + th, x0:x0 + tw] += weight
    return (out / weight_sum.to(out.device)).to(inputs[0].dtype)
