"""Denoise an image with a trained model: Fast (student), Full (SRDS), and the ablation modes.

Data flows one way: image -> linear normalisation -> noise transform (VST) -> slices
(2.5D stacks) -> networks -> slices -> inverse transform -> inverse normalisation,
so the result is in the input's units (HU stays HU) and geometry.

Full mode diffuses the normalised residual r = (y - c) / s around the blind-spot
estimate c = BSN(y), with s = std(y - c) over the whole image: the diffusion model
only has to add back the fine detail the blind-spot network smoothed away, and an
under-trained model (which predicts r = 0) leaves the BSN result unchanged.
Both estimates are blind to each voxel's own value; observation fusion (fusion.py)
gives it back, weighted by how reliable the estimate is around the voxel. The student
learns the fused Full result; on images unlike its training data it can still smooth too
much, so Fast gives back the share of each voxel's own value that Stein's estimate prefers.
Both then guide a collaborative Wiener filter of the noisy image (wiener.py), which gives back
the fine structure that similar patches, in the slice and its neighbours, agree on. A 2D model's
result is first averaged with the image's own hard-thresholding estimate. Under spatially
correlated noise (a wide blind spot's result only) each coefficient's noise is its exact variance
from the noise covariance read on the image (covariance.py), and a 2D model's image is the
filters' alone, its result only showing where the image is flat. A 2.5D model's
volume whose noise looks white goes to the volumetric filter instead (wiener.volumetric_filter,
BM4D's two steps on cubes), which beat the networks there; the networks do not run then. Where the networks'
result is the image under faint noise that does not read white, and what it removed follows the edges, it took
anatomy with the noise: the share of the input Stein's estimate prefers goes back (fusion.py).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from DiffDenoiseLib import noise_weight
from DiffDenoiseLib.covariance import WINDOW as COVARIANCE_WINDOW
from DiffDenoiseLib.diffusion import NoiseSchedule, srds_sample
from DiffDenoiseLib.fusion import (
    ANATOMY_EDGE_CORRELATION,
    GIVE_BACK_SHARES,
    choose_observation_share,
    fuse_unless_correlated,
    probe_step,
    reading_is_white_enough_for_the_share,
    removed_follows_edges,
)
from DiffDenoiseLib.imageio import Image
from DiffDenoiseLib.magnitude import check_mode as check_rician_bias_mode, remove_rician_bias, rician_bias_sigma
from DiffDenoiseLib.networks import (
    VIEW_COUNTS,
    BlindSpotNet,
    ConditionalUNet,
    NetworkConfig,
    StudentNet,
    dihedral_mean,
)
from DiffDenoiseLib.noise import (
    MIN_SIDE_TO_JUDGE_NOISE, NOISE_SHAPE_MIN_BINNING_RATIO, Curve, binning_noise_reading,
    estimate_transform_params, get_transform, noise_variance_curve, reading_is_faint_and_mildly_correlated,
    reading_is_strong,
)
from DiffDenoiseLib.normalization import Normalization, padding_mask, raise_padding
from DiffDenoiseLib.progress import CancelToken, Progress, ProgressTimer
from DiffDenoiseLib.settings import JsonSettings
from DiffDenoiseLib.slicing import TILE, as_slice_stack, choose_slice_axis, context_stack, from_slice_stack, map_tiled
from DiffDenoiseLib.wiener import (
    CUBE,
    WIENER_2D_NOISE_SCALE,
    collaborative_hard_threshold,
    collaborative_wiener,
    noise_shape_steps,
    slices_read,
    volumetric_filter,
    volumetric_filter_steps,
    wiener_reference_slices,
)

STAGES = ("bsn", "diffusion", "student")
# Working copies of a volume take about 40 bytes a voxel: above this, ask for a crop instead of running out of memory.
MAX_VOXELS = 400_000_000
MODES = ("fast", "full", "bsn", "single")
MADE_BY_VOLUMETRIC_FILTER = "volumetric filter"  # `filters_made_the_image` where the networks did not run
# Under correlated noise a 2.5D result's Wiener groups gather patches from this many slices either way, beyond the
# networks' own context of 2: on 8 held-out 14-slice slabs of the benchmark's two volumes (correlated 1.2, Full)
# 3 slices gained 0.08 dB on Colin27 and 0.12 on the InVesalius CT over 2, 4 slices 0.09 and 0.18, for 1.3 and 1.6
# times the Wiener step's time; with 4, groups of 96 or 128 instead of 64 gained 0.04 on the CT and -0.01 on Colin27;
# 6 slices gained nothing over 4 (-0.01 on both).
CORRELATED_FILTER_SLICE_REACH = 4
# A one-pixel 2D model's result is followed by the correlated-noise filters only on slices this large: a 64-pixel
# crop offers one window of covariance.WINDOW to read the noise in, and on 2 of 8 such crops of pydicom-data's real
# chest radiograph (strong noise of its own, read as not white) the filters left a grid pattern.
MIN_SIDE_FOR_ONE_PIXEL_FILTERS = 96
NETWORK_SHARE_2D = 0.1  # of a 2D model's result in its Wiener pilot (white noise), the rest hard thresholding's
NoiseReading = Callable[[], Tuple[float, float]]  # a binning_noise_reading of the image, taken once when first asked


@dataclass
class SamplingConfig(JsonSettings):
    """How Full mode samples: the diffusion formulation and the SRDS settings."""

    KIND = "sampling"

    prediction: str = "v"  # eps | v | x0
    schedule: str = "cosine"  # cosine | linear
    timesteps: int = 1000
    steps: int = 5  # DDIM steps
    pairs: int = 1  # symmetric pairs averaged
    t_start: Optional[int] = 120  # truncated start; None starts from t = T
    fusion: bool = True  # give each voxel's own noisy value back to the blind estimate (fusion.py)
    # flips and turns of the image (1, 2, 4 or 8) whose blind-spot estimates are averaged (networks.dihedral_mean)
    self_ensemble: int = 4

    def __post_init__(self):
        if self.self_ensemble not in VIEW_COUNTS:
            raise ValueError(f"self_ensemble must be 1, 2, 4 or 8 views, not {self.self_ensemble}")


@dataclass
class DenoisingModel:
    """The networks of one model and its card; a network is None when its stage is not trained."""

    config: NetworkConfig
    sampling: SamplingConfig
    card: dict
    bsn: Optional[BlindSpotNet] = None
    diffusion: Optional[ConditionalUNet] = None
    student: Optional[StudentNet] = None

    def stages(self) -> List[str]:
        return [s for s in STAGES if getattr(self, s) is not None]

    def network(self, stage: str) -> torch.nn.Module:
        net = getattr(self, stage)
        if net is None:
            raise ValueError(f"model '{self.card.get('name', '?')}' has no trained {stage} stage")
        return net

    def state_dicts(self) -> Dict[str, dict]:
        return {s: getattr(self, s).state_dict() for s in self.stages()}

    @classmethod
    def build(cls, config: NetworkConfig, sampling: SamplingConfig, card: dict, stages=STAGES) -> "DenoisingModel":
        """Fresh (untrained) networks for `stages`."""
        constructors = {"bsn": BlindSpotNet, "diffusion": ConditionalUNet, "student": StudentNet}
        nets = {s: constructors[s](config) for s in stages}
        return cls(config=config, sampling=sampling, card=card, **nets)

    @classmethod
    def from_card(cls, card: dict, state_dicts: Dict[str, dict]) -> "DenoisingModel":
        config = NetworkConfig.from_dict(card["architecture"])
        sampling = SamplingConfig.from_dict(card["sampling"])
        model = cls.build(config, sampling, card, stages=[s for s in STAGES if s in state_dicts])
        for stage, state in state_dicts.items():
            model.network(stage).load_state_dict(state)
        return model.eval()

    def to(self, device) -> "DenoisingModel":
        for stage in self.stages():
            getattr(self, stage).to(device)
        return self

    def eval(self) -> "DenoisingModel":
        for stage in self.stages():
            getattr(self, stage).eval()
        return self

    def blind_spot_estimate(self, views: Optional[int] = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The blind-spot estimate as denoising and training use it: averaged over `views` flips and
        turns of the image (None: the model's `sampling.self_ensemble`)."""
        return dihedral_mean(self.network("bsn").estimate, views or self.sampling.self_ensemble)

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.sampling.timesteps, self.sampling.schedule)


@dataclass
class DenoiseResult:
    image: Image
    uncertainty: Optional[Image]
    seconds: float
    details: dict = field(default_factory=dict)


class Prepared(NamedTuple):
    """An image as the networks get it: `z`, normalised and stabilised, with its padding outside the field of view
    (None when it has none; normalization.padding_mask) raised to the lowest real intensity first."""

    z: np.ndarray
    normalization: Normalization
    transform: object
    padding: Optional[np.ndarray]


def prepare_array(array: np.ndarray, transform_spec: dict) -> Prepared:
    """Normalise and stabilise an image for the networks."""
    if np.size(array) > MAX_VOXELS:
        raise ValueError(f"the image has {np.size(array):,} voxels, more than the {MAX_VOXELS:,} DiffDenoise "
                         f"processes at once (about {np.size(array) * 40 / 2 ** 30:.0f} GiB of working memory); "
                         "crop or split it first")
    data = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise ValueError(f"the image has {int(np.size(data) - np.isfinite(data).sum())} NaN or infinite voxels")
    padding = padding_mask(data)
    data = raise_padding(data, padding) if padding is not None else data
    normalization = Normalization.fit(data)
    normalized = normalization.forward(data)
    name = transform_spec.get("name", "none")
    params = {k: v for k, v in transform_spec.items() if k != "name"}
    if not params:
        params = estimate_transform_params(name, normalized)
    transform = get_transform(name, **params)
    return Prepared(transform.forward(normalized), normalization, transform, padding)


def run_network_on_slices(
    fn: Callable[..., torch.Tensor],
    slices: np.ndarray,
    context: int,
    device: torch.device,
    extra: Optional[np.ndarray] = None,
    batch_size: int = 8,
    tile: int = TILE,
    progress: Optional[Callable[[int], None]] = None,
    cancel: Optional[CancelToken] = None,
    indices: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """Apply `fn(stack[, extra]) -> (B, C, h, w)` to slices of a (n, H, W) array; returns (len(indices), C, H, W).

    Slices (all, or those in `indices`) go through in batches and, when large, in
    blended tiles; their neighbours come from the whole array. `extra`, when given,
    holds one (H, W) slice per processed slice, passed as a second (B, 1, H, W) input
    (Full mode passes the blind-spot estimate).
    """
    outputs = []
    indices = list(range(slices.shape[0])) if indices is None else list(indices)
    for start in range(0, len(indices), batch_size):
        if cancel is not None:
            cancel.raise_if_cancelled()
        idx = indices[start:start + batch_size]
        batch = torch.from_numpy(np.stack([context_stack(slices, i, context) for i in idx]).astype(np.float32))
        inputs = [batch.to(device)]
        if extra is not None:
            inputs.append(torch.from_numpy(extra[start:start + len(idx), None].astype(np.float32)).to(device))
        with torch.no_grad():
            outputs.append(map_tiled(fn, inputs, tile=tile).float().cpu().numpy())
        if progress is not None:
            progress(len(idx))
    return np.concatenate(outputs)


def residual_scale(slices: np.ndarray, estimate: np.ndarray) -> float:
    """s = std(y - c): the residual diffusion's unit of intensity for this image."""
    return float(max(np.std(slices - estimate), 1e-6))


def denoise_image(
    image: Image,
    model: DenoisingModel,
    mode: str = "fast",
    steps: Optional[int] = None,
    pairs: Optional[int] = None,
    t_start: Optional[int] = -1,
    slice_axis: Optional[int] = None,
    device: Optional[torch.device] = None,
    progress: Optional[Callable[[Progress], None]] = None,
    cancel: Optional[CancelToken] = None,
    seed: int = 0,
    tile: int = TILE,
    fusion: Optional[bool] = None,
    slice_range: Optional[Tuple[int, int]] = None,
    self_ensemble: Optional[int] = None,
    rician_bias: str = "auto",
) -> DenoiseResult:
    """Denoise a 2D image or a volume; the input image is never modified.

    `t_start=-1` keeps the model's calibrated truncated start; None forces a full start.
    `fusion=None` keeps the model's setting for observation fusion (in Fast mode: the share of each
    voxel's own value that Stein's estimate gives back, `keep_observation_share`);
    `self_ensemble=None` the model's number of views averaged in the blind-spot estimate.
    `rician_bias` "auto" removes the Rician bias of MR magnitude data from the result when the image reads as such
    (magnitude.py), "remove" always, "keep" never; a model trained with a variance-stabilising transform keeps its
    own inverse instead.
    `slice_range=(start, stop)` denoises only those slices along the slice axis (a preview
    of the slice in view, say) and returns them as a sub-volume in place; their
    neighbours still feed a 2.5D model. The networks' outputs are exactly those slices of
    the whole-image run; fusion's margin or share and Full's residual scale come from these
    slices alone, as does the noise covariance of the filters under correlated noise
    (`networks_reach`), so the result can differ slightly; whether the noise looks white or correlated, and
    how strong, is read on the whole image, as in its run.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
    check_rician_bias_mode(rician_bias)
    started = time.monotonic()
    device = device or torch.device("cpu")
    model.to(device).eval()
    k = model.config.context_slices
    transform_spec = model.card.get("transform", {"name": "none"})
    prepared = prepare_array(image.array, transform_spec)
    z = prepared.z
    # a model with a variance-stabilising transform has its own inverse for the bias
    rician_sigma = (rician_bias_sigma(image.array, image.modality, rician_bias)
                    if transform_spec.get("name", "none") == "none" else None)
    axis = choose_slice_axis(image.spacing, z.shape) if slice_axis is None else slice_axis
    slices = as_slice_stack(z, axis)
    n = slices.shape[0]
    start, stop = (0, n) if slice_range is None else checked_slice_range(slice_range, n)
    fuse = bool(model.sampling.fusion if fusion is None else fusion)
    details: dict = {"mode": mode, "slice_axis": int(axis), "slices": stop - start,
                     "rician_bias_removed": rician_sigma is not None}
    if rician_sigma is not None:
        details["rician_sigma"] = rician_sigma
    if slice_range is not None:
        details["slice_range"] = [start, stop]
    timer = ProgressTimer(total=1)

    def advance(count: int) -> None:
        timer.advance(count)
        if progress is not None:
            progress(Progress("denoise", timer.done, timer.total, None, timer.eta_s()))

    def filtered_one() -> None:
        if cancel is not None:
            cancel.raise_if_cancelled()
        advance(1)

    # the binning reading of the whole image (fusion.py, noise.py), read once, where a step needs it
    noise_reading = functools.cache(lambda: binning_noise_reading(slices))
    if fuse and volumetric_filter_makes_the_image(model.config, slices, noise_reading):
        shape = filters_read_the_noise_shape(noise_reading())
        timer.total = volumetric_filter_steps(n, range(start, stop), shape)
        denoised = volumetric_filter(slices, noise_variance_curve(slices), indices=range(start, stop), device=device,
                                     progress=filtered_one, correlated_noise=shape,
                                     deep_groups=deep_wiener_groups(mode))
        details.update(correlated_noise=not reading_is_white_enough_for_the_share(noise_reading()),
                       faint_noise=not reading_is_strong(noise_reading()), noise_shape_read=shape, wiener=True,
                       fusion=False, filters_made_the_image=MADE_BY_VOLUMETRIC_FILTER)
        return finished_result(image, prepared, axis, start, denoised, None, started, details,
                               rician_sigma)
    # the Wiener filter of a 2.5D model's result reads k slices on each side (more under correlated noise), so the
    # networks also run on those neighbours of the slice range; slices too small to judge the noise get no
    # filter, and so no neighbours
    filters_may_run = fuse and min(slices.shape[-2:]) >= MIN_SIDE_TO_JUDGE_NOISE
    reach = correlated_filter_reach(model.config) if filters_may_run else 0
    margin = networks_reach(model.config) if filters_may_run else 0
    lo, hi = max(0, start - margin), min(n, stop + margin)
    indices = None if slice_range is None else list(range(lo, hi))
    passes = {"fast": 1 + fuse, "bsn": 1, "full": 2, "single": 2}[mode]
    timer.total = (hi - lo) * passes + fuse * (stop - start) * (1 if k else 2)

    run = dict(context=k, device=device, tile=tile, progress=advance, cancel=cancel)
    uncertainty = None
    white_noise = False
    # the noise variance curve of the whole image, for fusion, Fast's share and the Wiener filter alike
    white = noise_variance_curve(slices) if fuse else None
    if mode == "fast":
        denoised = run_network_on_slices(model.network("student"), slices, indices=indices, **run)[:, 0]
        details["fusion"] = fuse
        if fuse:
            denoised, details["observation_share"], details["correlated_noise"] = keep_observation_share(
                model, slices, denoised, lo, hi, indices, run, seed, white, noise_reading)
            white_noise = details["observation_share"] is not None
    else:
        details["self_ensemble"] = int(self_ensemble or model.sampling.self_ensemble)
        denoised = run_network_on_slices(model.blind_spot_estimate(details["self_ensemble"]), slices,
                                         indices=indices, **run)[:, 0]
        if mode in ("full", "single"):
            denoised, uncertainty, sampling = sample_residual(model, slices, denoised, steps, pairs, t_start,
                                                               mode == "single", seed, run, indices=indices)
            details.update(sampling)
        details["fusion"] = fuse
        if fuse:
            denoised, weight, details["correlated_noise"] = fuse_unless_correlated(slices[lo:hi], denoised, white,
                                                                                   noise_reading)
            details["fusion"] = white_noise = weight is not None
            if weight is not None and uncertainty is not None:
                uncertainty = uncertainty * weight
    correlated = bool(details.get("correlated_noise"))
    correlated_filters = fuse and correlated and correlated_noise_filters_apply(model, slices, noise_reading)
    if fuse:
        details["wiener"] = (white_noise and filters_may_run) or correlated_filters
    filtering = dict(indices=range(start - lo, stop - lo), device=device, progress=filtered_one)
    if correlated_filters:
        matched_on, gains = denoised, None
        if mode == "fast" and k:  # the student's result sets the Wiener gains, a blind-spot estimate the groups
            matched_on = run_network_on_slices(model.blind_spot_estimate(), slices, indices=indices, **run)[:, 0]
            gains = denoised
            details["groups_matched_on"] = "blind-spot estimate"
        elif k and mode in ("full", "single") and model.student is not None:  # the sampler's result matches them
            timer.total += hi - lo
            gains = run_network_on_slices(model.network("student"), slices, indices=indices, **run)[:, 0]
            details["wiener_gains_from"] = "student"
        if k:  # the Wiener step's reference slices: those within reach of the range feed it too
            timer.total += wiener_reference_slices(hi - lo, filtering["indices"], reach, True) - (stop - start)
        denoised = correlated_noise_filters(slices[lo:hi], matched_on, white, reach, gains_from=gains, **filtering)
        if not k:  # the image owes the networks only where its noise was read: no uncertainty map of theirs
            uncertainty = None
            details.update(hard_threshold=True, filters_made_the_image="correlated-noise filters")
    elif details.get("wiener"):
        shape = False
        if not k:
            # A 2D model's result is averaged with the image's own hard-thresholding estimate (BM3D's first step),
            # and the average guides the Wiener filter: on the benchmark's 2D images under white noise half and half
            # gained 0.0 to 0.7 dB (Full and Fast) over the result alone guiding two passes, at the same cost; a
            # quarter 0.1 dB more on average; with the estimate's wider search a tenth 0.03 dB more than a quarter
            # (and than the estimate alone: 0.1 dB more on the shoulder MRI at Gaussian 6/255, 0.1 less on the head
            # CT at 25/255).
            # Strong noise that may be mildly correlated has its shape read by both steps.
            shape = details["noise_shape_read"] = filters_2d_read_the_noise_shape(
                min(slices.shape[-2:]), filters_read_the_noise_shape(noise_reading()))
            if shape:
                timer.total += noise_shape_steps(filtering["indices"])
            denoised = white_noise_pilot_2d(slices[lo:hi], denoised, white, noise_shape=shape, **filtering)
            details["hard_threshold"] = True
            if not shape:  # white noise: how much its Wiener step weighs the noise, chosen on the image
                timer.total += noise_weight.PROBES
                details["wiener_noise_scale"] = choose_noise_scale_2d(model, mode, slices[lo:hi], white, device, tile,
                                                                      cancel, filtered_one)
        # a 2.5D model's result (too few slices for the volumetric filter) guides it alone
        denoised = collaborative_wiener(slices[lo:hi], denoised, white, context=k, noise_shape=shape,
                                        deep_groups=deep_wiener_groups(mode),
                                        noise_scale=details.get("wiener_noise_scale", WIENER_2D_NOISE_SCALE),
                                        **filtering)
    else:
        # faint noise that does not read white: checked for anatomy the networks took with it (slices too small for the
        # filters are too small to read the noise)
        if filters_may_run and correlated and not reading_is_strong(noise_reading()):
            denoised, share, details["removed_edge_correlation"] = give_back_where_anatomy_was_taken(
                model, mode, slices, denoised, lo, hi, indices, run, seed, white)
            if share is not None:
                details["observation_share"], details["anatomy_given_back"] = share, True
                if uncertainty is not None:
                    uncertainty = uncertainty * (1.0 - share)
        denoised = denoised[start - lo:stop - lo]
    if timer.done < timer.total:  # the bar counted steps the noise made unneeded (Fast's probe, the filter)
        advance(timer.total - timer.done)
    if uncertainty is not None:
        uncertainty = uncertainty[start - lo:stop - lo]
    return finished_result(image, prepared, axis, start, denoised, uncertainty, started, details,
                           rician_sigma)


def correlated_noise_filters_apply(model: DenoisingModel, slices: np.ndarray,
                                   noise_reading: Optional[NoiseReading] = None) -> bool:
    """Whether the correlated-noise filters make the image of `slices` (n, H, W) when their noise looks correlated
    (`correlated_filters_follow` the model, and the slices are large enough to read the noise on); `noise_reading`
    gives the binning reading of `slices` where it was already taken."""
    side = min(slices.shape[-2:])
    if side < MIN_SIDE_TO_JUDGE_NOISE:
        return False
    reading = noise_reading or (lambda: binning_noise_reading(slices))
    # the reading is taken only where its strength decides
    return correlated_filters_follow(model.config, lambda: reading_is_strong(reading()), side)


def correlated_filters_follow(config: NetworkConfig, strong_noise: Callable[[], bool], side: int) -> bool:
    """Whether the correlated-noise filters follow a model's networks on slices whose shorter side is `side` when
    the noise looks correlated, and `strong_noise()` (`noise.reading_is_strong`) or faint: a wide blind spot's
    models, and a 2D model's under strong noise on slices of MIN_SIDE_FOR_ONE_PIXEL_FILTERS or more.

    Under correlated noise the filters take each coefficient's exact noise variance from the noise's covariance,
    read on the image where a pilot is flattest (covariance.py, wiener.py). A 2.5D model's result guides the
    Wiener filter only if it removed such noise, which a wide blind spot does and a one-pixel one does not: on
    the demo's real head CT that result gave some of the noise back (high-pass std in the brain 3.5 HU against
    2.6) for 8 times the time; so only a wide blind spot's 2.5D model is filtered there. A 2D model's result only
    chooses where the noise is read (hard thresholding of the image itself guides the Wiener step), so whatever its
    blind spot: under noise of a 0.5-pixel kernel, which a one-pixel blind spot passes, the filters gave 0.7 to 6.0
    dB more than its result on 11 of the benchmark's training strips of its three 2D images (fresh draws; 1.1 less
    on one). Only under strong noise, though: where it is faint, the flattest windows hold anatomy as much as noise,
    and on a textured 64x64 image under noise of 2 units in 1500 the filters gave 27.3 dB where the shipped 2D MR
    model's Fast result gave 39.3 (the input 56.4).
    """
    return config.blind_spot_radius > 0 or (
        config.context_slices == 0 and side >= MIN_SIDE_FOR_ONE_PIXEL_FILTERS and strong_noise())


def correlated_filter_reach(config: NetworkConfig) -> int:
    """How many slices either way the filters of a model's result gather patches from: none for a 2D model, at
    least CORRELATED_FILTER_SLICE_REACH for a 2.5D model with a wide blind spot (its filters under correlated
    noise; the networks run on those slices too), the model's own context otherwise."""
    k = config.context_slices
    return max(k, CORRELATED_FILTER_SLICE_REACH) if k and config.blind_spot_radius > 0 else k


def networks_reach(config: NetworkConfig) -> int:
    """How many slices either way of a slice range the networks run on: all that the filters after them read for
    it (`wiener.slices_read`), so the range gets what the whole image's run gives there. Under correlated noise
    a wide blind spot's Wiener groups go back to every slice their members lie in, so the reference slices
    within reach of the range, and their own groups' slices, are read too: twice the filters' reach. Measured on
    a 32-slice slab of each benchmark volume (correlated 1.2, Fast, the centre slice as a slice range against the
    whole slab's run): with the filters' reach alone it differed by 0.55 (Colin27's units) and 5.5 HU rms and read
    0.05 and 0.10 dB lower; with twice it by 0.04 and 0.35 HU rms (the noise covariance is read on the slices
    given) and 0.00 dB."""
    reach = correlated_filter_reach(config)
    return slices_read(reach, correlated_noise=config.blind_spot_radius > 0)


def correlated_noise_filters(noisy: np.ndarray, denoised: np.ndarray, white: Curve, context: int,
                             indices: Sequence[int], device: Optional[torch.device] = None,
                             progress: Optional[Callable[[], None]] = None,
                             gains_from: Optional[np.ndarray] = None) -> np.ndarray:
    """The image of the slices `indices` of `noisy` (n, H, W) under correlated noise, from the networks' result
    `denoised` on the same n slices (`context` slices on each side of a 2.5D model's).

    A 2.5D model's result guides the Wiener filter, whose groups also reach `context` slices either way; with
    `gains_from` (the student's result) `denoised` (Fast's blind-spot estimate, Full's SRDS result) only matches
    the groups. A student sees the noise at the voxel it estimates, and its errors follow that noise: matching on
    its result groups patches by their noise, which the group's average then keeps. On the benchmark's InVesalius
    CT under correlated noise (the student distilled from Full's filtered image) matching on the student's result
    gave 30.09 dB, on the one-view blind-spot estimate 32.85 (the blind-spot estimate alone 32.43, Full 32.42); on
    Colin27 27.37 and 27.41. As gains, though, the student's result (distilled from that filtered image over
    the whole training volumes) knows the coefficients better than SRDS's result (about 25 dB there): with fresh
    draws on the benchmark's 8 training slabs Full's groups matched on SRDS's result and its gains from the
    student's gave +0.71 dB on average on the InVesalius CT (+0.41 to +1.26) and +0.01 on Colin27 (-0.04 to +0.03)
    over SRDS's gains; gains from the average of both, +0.43 and +0.06. A 2D model's result only picks the flat
    windows the noise is read in: the image's own
    hard-thresholding estimate guides the Wiener filter. On the benchmark's three 2D images that gained 0.4 to
    1.5 dB over the earlier average of the result and a hard thresholding with the noise measured on the
    residual; a tenth of the result in the pilot lost 0.01 to 0.05 dB, a quarter up to 0.17.

    A 2.5D model's noise covariance is read on the residual y - `denoised` (covariance.py): its wide blind spot
    and the neighbouring slices' independent noise leave little of the noise in its result, while a crop without
    flat tissue reads its anatomy as noise in the windows. Measured on the benchmark's correlated noise with fresh
    draws on the 8 training slabs of its two volumes (never its test slices): Colin27 +0.12 to +0.34 dB (Full;
    Fast +0.08 to +0.31), the InVesalius CT +0.01 to +0.05 (Fast +0.03 to +0.08). A 2D model's result and the
    hard-thresholding estimate keep much of the noise, so their residuals read it 30 to 40 % low: there it is
    read in the flattest windows of y.
    """
    filtering = dict(indices=indices, device=device, progress=progress, correlated_noise=True)
    if not context:
        estimate = collaborative_hard_threshold(noisy, denoised, white, **filtering)
        return collaborative_wiener(noisy[list(indices)], estimate, white, **{**filtering, "indices": None})
    return collaborative_wiener(noisy, denoised, white, context=context, gains_from=gains_from,
                                covariance_on_residual=True, **filtering)


def white_noise_pilot_2d(noisy: np.ndarray, denoised: np.ndarray, white: Curve, noise_shape: bool = False,
                         **filtering) -> np.ndarray:
    """A 2D model's Wiener pilot under white noise: NETWORK_SHARE_2D of its result `denoised`, the rest the image's
    own hard-thresholding estimate (BM3D's first step) of the slices `noisy` (n, H, W)."""
    estimate = collaborative_hard_threshold(noisy, denoised, white, noise_shape=noise_shape, **filtering)
    return NETWORK_SHARE_2D * denoised + (1 - NETWORK_SHARE_2D) * estimate


def choose_noise_scale_2d(model: DenoisingModel, mode: str, noisy: np.ndarray, white: Curve, device: torch.device,
                          tile: int, cancel: Optional[CancelToken], progress: Callable[[], None]) -> float:
    """How many times a 2D model's Wiener step weighs the white noise of the slices `noisy` (noise_weight.py): the
    chain rerun on recorrupted crops, its network the student (Fast's, and Full's stand-in: the sampler would take
    minutes) or, in "bsn" mode or without a student, the blind-spot network."""
    net = (model.blind_spot_estimate() if mode == "bsn" or model.student is None else model.network("student"))

    def pilot_of(crops: np.ndarray, curve: Curve) -> np.ndarray:
        result = run_network_on_slices(net, crops, context=0, device=device, tile=tile, cancel=cancel)[:, 0]
        return white_noise_pilot_2d(crops, result, curve, device=device)

    return noise_weight.choose_noise_scale(noisy, white, pilot_of, deep_groups=deep_wiener_groups(mode), device=device,
                                           progress=progress)[0]


def volumetric_filter_makes_the_image(config: NetworkConfig, slices: np.ndarray, noise_reading: NoiseReading) -> bool:
    """Whether the volume `slices` of a 2.5D model gets the volumetric filter's estimate instead of the networks':
    a volume of CUBE slices or more, large enough to judge its noise, whose noise looks white (by `noise_reading`,
    the binning reading of `slices`), or, for a one-pixel blind spot, strong and not white (`noise.reading_is_strong`);
    the filter reads the noise's shape where `filters_read_the_noise_shape`.

    On the benchmark's two volumes under white noise (Gaussian, Poisson, Gamma, Rician) the filter's two steps
    alone beat the networks' result filtered with 2D patches from five slices by 0.6 to 2.2 dB, and every way
    measured of adding the networks' result to them (as a share of the pilot, as the guide of block matching, as
    a share of the output) lost or tied; so the networks do not run there. Under noise of a 0.5-pixel kernel,
    which a one-pixel blind spot passes, the filter told the noise's covariance beat the networks' result (Fast) by
    1.5 to 2.6 dB on Colin27's test and held-out slabs and by 1.3 to 5.1 on the InVesalius CT's. Under noise of a
    1.2-pixel kernel it lost 0.3 to 4.6 dB to a wide blind spot's result and its filters, which keep that case.
    Faint noise that does not read white goes to the filter, which reads its shape, where its binning ratio is that
    of mildly correlated noise (`noise.reading_is_faint_and_mildly_correlated`; a nearly clean scan's own noise of
    a sharp kernel): on the benchmark volumes' held-out slabs (three of each) under noise of a 0.5- or 0.6-pixel
    kernel at std 0.005 to 0.02 of the range, the 21 slabs that reading sent to the filter gained 0.08 to 3.60 dB
    over the networks' result (mean 1.80), which smooths fine anatomy away with faint noise. Faint noise read at
    higher ratios (wider kernels, or fine anatomy) keeps the networks' result (checked for anatomy taken with the
    noise: `give_back_where_anatomy_was_taken`): the filter, whose level comes from the
    noise curve's high-pass reading, hardly sees such noise (up to 3.4 dB below the networks under kernels of 0.7 to
    1.2 pixels at std 0.01 to 0.03).
    """
    if config.context_slices == 0 or slices.shape[0] < CUBE or min(slices.shape[-2:]) < MIN_SIDE_TO_JUDGE_NOISE:
        return False
    reading = noise_reading()
    return volumetric_filter_follows(config, reading_is_white_enough_for_the_share(reading), reading_is_strong(reading),
                                     reading_is_faint_and_mildly_correlated(reading))


def volumetric_filter_follows(config: NetworkConfig, white_noise: bool, strong_noise: bool,
                              faint_mildly_correlated: bool = False) -> bool:
    """Whether the volumetric filter makes the image of a volume (of CUBE slices or more) for a model, instead of its
    networks, when the noise looks white (`white_noise`) or not, and strong or faint (`noise.reading_is_strong`):
    for a 2.5D model under white noise, and for a one-pixel 2.5D model under strong noise of any kind or faint noise
    that reads mildly correlated (`noise.reading_is_faint_and_mildly_correlated`; see
    `volumetric_filter_makes_the_image` for why)."""
    return config.context_slices > 0 and (
        white_noise or (config.blind_spot_radius == 0 and (strong_noise or faint_mildly_correlated)))


def deep_wiener_groups(mode: str) -> bool:
    """Whether the Wiener step's groups under white noise in `mode` are as deep as their similar members allow: every
    mode's but Fast's, which keeps shallower groups for a third to a fifth of the time. The volumetric filter's
    (`wiener.CUBE_WIENER_GROUP` against CUBE_GROUP_WIENER): on the InVesalius CT's middle 16 slices, 256 x 256,
    1.2 s a slice against 3.6 on two cores, 0.14 dB less under Gaussian noise of 25/255 and 0.04 less under 6/255. A
    2D model's (`wiener.WIENER_GROUP_2D` against SHALLOW_WIENER_GROUP_2D): a fifth of the Wiener step's time, up to
    0.3 dB less on the 693 CT under 25/255 and within 0.04 elsewhere (measured beside the constants)."""
    return mode != "fast"


def filters_read_the_noise_shape(reading: Tuple[float, float]) -> bool:
    """Whether the filters read the noise's shape (`wiener.SHAPE_ROUNDS`; the volumetric filter, and a 2D model's
    filters under noise that reads white: `filters_2d_read_the_noise_shape`) on an image whose binning
    reading (ratio, strength) is `reading`: where strong noise reads a ratio above NOISE_SHAPE_MIN_BINNING_RATIO,
    which noise of a 0.4-pixel kernel does and white noise often does too (the shape then leaves the filter of white
    noise as it was, for about 4 times its time on a short slab), and where faint noise reads mildly correlated
    (`noise.reading_is_faint_and_mildly_correlated`). Faint noise that reads white keeps the filter of white noise:
    its residual holds as much anatomy as noise."""
    return ((reading_is_strong(reading) and reading[0] > NOISE_SHAPE_MIN_BINNING_RATIO)
            or reading_is_faint_and_mildly_correlated(reading))


def filters_2d_read_the_noise_shape(side: int, noise_shape: bool) -> bool:
    """Whether a 2D model's filters under white-looking noise read the noise's shape on slices whose shorter side is
    `side`: where the binning reading asks for it (`noise_shape`, `filters_read_the_noise_shape`) and one window of
    the covariance's read (covariance.WINDOW) fits. On 12 strips of the benchmark's three 2D images (44 to 84 by 256
    voxels, fresh draws, both steps alone) against the filters of white noise: noise of a 0.4-pixel kernel +0.5 to
    +1.9 dB, 0.45 +1.9 to +4.2 (binning ratios 1.2 to 1.6 and 1.6 to 2.1); Gaussian 25/255 and Poisson 200 -0.52 to
    +0.31 (the shoulder MRI's Poisson noise -0.52 and -0.24: the image's own noise is correlated), for 1 to 2 s a
    strip against 0.1 to 0.3. Through the pipeline on the same strips (2026-12-06, fresh draws, kernels 0.35 to 0.5,
    std 0.05 to 0.1 of the range, the 73 that read strong with a ratio of 1.3 to 2.5): Fast +1.96 dB on average
    over the filters of white noise (-0.30 to +5.04, 71 higher), Full +1.91 (-0.29 to +5.04), where the filters of
    white noise had lain up to 4.3 dB below the networks' result alone; on 32 to 40-pixel crops of them +2.2 to
    +2.4 on average (-0.68 at worst); under 32 pixels, read in one smaller window, +3.3 to +4.0 but down to -1.5. The
    shape was read on slices of 96 pixels or more only until then, the size the correlated-noise filters ask
    (MIN_SIDE_FOR_ONE_PIXEL_FILTERS); the real radiograph's 32 to 80-pixel crops that now read it (strong noise of its
    own, ratio 1.3 to 2.5) came out smoother and without the vertical streaks the filters of white noise left, and with
    no grid pattern."""
    return side >= COVARIANCE_WINDOW and noise_shape


def finished_result(image: Image, prepared: Prepared, axis: int, start: int, denoised: np.ndarray,
                    uncertainty: Optional[np.ndarray], started: float, details: dict,
                    rician_sigma: Optional[float] = None) -> DenoiseResult:
    """The denoised slices (and their uncertainty) back in the input's units and geometry, with the Rician bias
    removed for a `rician_sigma` (magnitude.py); padding outside the field of view keeps its value (and no
    uncertainty)."""
    ndim = prepared.z.ndim
    denoised_z = from_slice_stack(denoised, axis, ndim)

    def in_units(values: np.ndarray) -> np.ndarray:
        output = prepared.normalization.inverse(prepared.transform.inverse_denoised(values))
        return output if rician_sigma is None else remove_rician_bias(output, rician_sigma)

    output = in_units(denoised_z.astype(np.float64))
    padding = None
    if prepared.padding is not None:
        within = [slice(None)] * ndim
        within[axis] = slice(start, start + denoised_z.shape[axis])
        padding = prepared.padding[tuple(within)]
        output[padding] = np.asarray(image.array)[tuple(within)][padding]
        details["padding"] = {"value": float(np.min(image.array)), "voxels": int(padding.sum())}
    result_image = slice_range_image(image, axis, start, output.astype(np.float32))
    uncertainty_image = None
    if uncertainty is not None:
        spread = from_slice_stack(uncertainty, axis, ndim).astype(np.float64)
        upper = in_units(denoised_z + spread)
        spread = np.abs(upper - output)
        if padding is not None:
            spread[padding] = 0.0
        uncertainty_image = slice_range_image(image, axis, start, spread.astype(np.float32))
    return DenoiseResult(result_image, uncertainty_image, time.monotonic() - started, details)


def keep_observation_share(model, slices, denoised, start, stop, indices, run, seed, white, noise_reading):
    """(Fast's result with the share of y - m that Stein's estimate prefers given back, that share or None,
    whether the noise looks correlated); `denoised` holds the student's output m on slices start..stop, `white`
    the image's noise variance curve, `noise_reading` its binning reading.

    The student runs once more on the image plus a small random-sign probe, which measures how
    much of each voxel's own noise m kept (fusion.choose_observation_share). Unless the noise
    looks white (fusion.reading_is_white_enough_for_the_share), m is returned as it is.
    """
    noisy = slices[start:stop]
    if min(slices.shape[-2:]) < MIN_SIDE_TO_JUDGE_NOISE:  # too small to judge the noise
        return denoised, None, False
    if not reading_is_white_enough_for_the_share(noise_reading()):
        return denoised, None, True
    probed, probe, step = student_probe(model, slices, start, stop, indices, run, seed, white)
    share = choose_observation_share(noisy, denoised, probed, probe, step, white)
    return denoised + share * (noisy - denoised), share, False


def student_probe(model, slices, start, stop, indices, run, seed, white):
    """(the student's output on the image plus a small random-sign probe, that probe, its step) on slices
    start..stop, for Stein's estimate of the student's share (fusion.choose_observation_share)."""
    step = probe_step(white)
    probe = np.random.default_rng(seed).choice(np.array([-1.0, 1.0], dtype=np.float32), size=slices.shape)
    probed = run_network_on_slices(model.network("student"), slices + step * probe, indices=indices, **run)[:, 0]
    return probed, probe[start:stop], step


def give_back_where_anatomy_was_taken(model, mode, slices, denoised, start, stop, indices, run, seed, white):
    """(the networks' result with the share of y - m that Stein's estimate prefers given back, that share or None,
    how much what they removed follows the image's edges) where, under faint noise that does not read white, what
    they removed from slices start..stop follows the edges (fusion.removed_follows_edges above
    fusion.ANATOMY_EDGE_CORRELATION): they took anatomy with the noise. The share may be all of y - m; Fast's is
    measured with the student's probe, the blind-spot modes' needs none."""
    noisy = slices[start:stop]
    edges = removed_follows_edges(noisy, denoised)
    if edges <= ANATOMY_EDGE_CORRELATION:
        return denoised, None, edges
    probed, probe, step = (student_probe(model, slices, start, stop, indices, run, seed, white) if mode == "fast"
                           else (None, None, None))
    share = choose_observation_share(noisy, denoised, probed, probe, step, white, shares=GIVE_BACK_SHARES)
    return denoised + share * (noisy - denoised), share, edges


def checked_slice_range(slice_range: Tuple[int, int], n: int) -> Tuple[int, int]:
    """(start, stop) as integers within the image's n slices, with at least one slice."""
    start, stop = (int(v) for v in slice_range)
    if not 0 <= start < stop <= n:
        raise ValueError(f"the slice range {start}:{stop} is not within the image's {n} slice(s) "
                         f"(0:{n} is all of them)")
    return start, stop


def slice_range_image(image: Image, axis: int, start: int, array: np.ndarray) -> Image:
    """`array`, slices start.. of `image` along numpy `axis`, with the geometry that puts it in place."""
    if array.shape == image.array.shape:
        return replace(image, array=array)
    offset = np.zeros(array.ndim)
    offset[array.ndim - 1 - axis] = start * image.spacing[array.ndim - 1 - axis]  # numpy axis -> (x, y, z) index
    direction = np.reshape(image.direction, (array.ndim, array.ndim))
    origin = np.asarray(image.origin) + direction @ offset
    return replace(image, array=array, origin=tuple(float(v) for v in origin))


def sample_residual(model, slices, estimate, steps, pairs, t_start, single, seed, run, indices=None, scale=None):
    """SRDS (or one DDIM sample) of the residual around the blind-spot estimate of every slice.

    Returns (denoised, uncertainty or None, settings used) for the slices in `indices`
    (all by default); `estimate` is the BSN output of those slices. The residual scale
    comes from them too, unless `scale` is given.
    """
    sampling = model.sampling
    steps = steps or sampling.steps
    pairs = pairs or sampling.pairs
    t_start = sampling.t_start if t_start == -1 else t_start
    schedule = model.schedule
    if scale is None:
        scale = residual_scale(slices if indices is None else slices[indices], estimate)
    generator = torch.Generator(device=run["device"]).manual_seed(seed)
    diffusion = model.network("diffusion")
    k = run["context"]

    def sample(stack: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        cond = torch.cat([c, stack[:, :k], stack[:, k + 1:]], dim=1)
        mean, spread = srds_sample(diffusion, cond, schedule, steps=steps, pairs=pairs, t_start=t_start,
                                   prediction=sampling.prediction, generator=generator, single=single)
        return torch.cat([c + scale * mean, scale * spread], dim=1)

    both = run_network_on_slices(sample, slices, extra=estimate, indices=indices, **run)
    info = {"steps": int(steps), "pairs": int(pairs), "t_start": t_start, "residual_scale": scale,
            "single_sample": bool(single)}
    return both[:, 0], (None if single else both[:, 1]), info
