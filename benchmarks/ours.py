"""DiffDenoise's modes as the benchmark runs them: the shipped default model for the image's modality.

The noisy slice goes through `denoise_image` in the scanner's units (HU for CT), exactly
as a user's image would, and comes back to the benchmark's [0, 1] scale for scoring.
"two-samples" averages two independent DDIM samples (seeds 0 and 1): the baseline that
SRDS's symmetric pair must beat. "full-unfused" and "single-unfused" are Full (SRDS) and one DDIM
sample without observation fusion and the filters after it: the samplers themselves, which shows what
SRDS's pair adds over one sample, and what fusion and the filters add. A volume's test slice goes to
the shipped 2.5D default where one is installed, with its neighbouring noisy slices. Where the volumetric
filter makes the image (the networks do not run: `pipeline.volumetric_filter_makes_the_image`), the modes
with fusion are one computation, or two (Fast's shallower groups: `pipeline.deep_wiener_groups`), so
each runs once (`measured_modes`), and the oracle's image is Fast's (`fast_image_is_the_oracles`). Elsewhere
"two-samples" takes "single"'s run as its first sample (seed 0, the same computation) and runs the second.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from DiffDenoiseLib.imageio import Image
from DiffDenoiseLib.noise import noise_looks_correlated
from DiffDenoiseLib.pipeline import MADE_BY_VOLUMETRIC_FILTER, DenoisingModel, denoise_image, deep_wiener_groups
from DiffDenoiseLib.store import ModelStore, load_model

from benchmarks.measure import measured
from benchmarks.suite import Case

MODES = ("bsn", "single-unfused", "single", "two-samples", "full-unfused", "full", "fast")
# the modes with fusion: (the pipeline's mode, how many times it runs); where the volumetric filter makes the image,
# the runs whose modes take the same groups (`deep_wiener_groups`) are the same computation, bit for bit
FUSED_RUNS = {"bsn": ("bsn", 1), "single": ("single", 1), "two-samples": ("single", 2), "full": ("full", 1),
              "fast": ("fast", 1)}


def default_model(modality: str, noisy: np.ndarray, noisy_slab: Optional[np.ndarray],
                  cache: Dict[str, Tuple[str, DenoisingModel]]) -> Tuple[str, DenoisingModel]:
    """(name, model) of the shipped default for `modality` and a `noisy` test slice, with the noisy slab around it
    or None for a 2D image (whose noise may look spatially correlated), chosen as `diffdenoise denoise` does;
    loaded once."""
    store = ModelStore()
    image = noisy if noisy_slab is None else noisy_slab
    name = store.default_for(modality, 1 if noisy_slab is None else noisy_slab.shape[0],
                             correlated_noise=noise_looks_correlated(image))
    if name not in cache:
        cache[name] = (name, load_model(store.resolve(name)))
    return cache[name]


def model_input(case: Case, noisy: np.ndarray, noisy_slab: Optional[np.ndarray], context: int) -> Tuple[Image, int]:
    """The image handed to the pipeline, and which slice of its output is the test slice.

    A 2.5D model gets the whole noisy slab, of which only the test slice (its centre) is denoised:
    the networks also run on the slices around it that the Wiener filter groups patches from, each
    with its own neighbours from the slab. A 2D model gets the slice alone.
    """
    spacing = (1.0, 1.0)
    if context > 0 and noisy_slab is not None:
        return Image(array=case.to_units(noisy_slab).astype(np.float32), spacing=spacing + (1.0,),
                     modality=case.modality), noisy_slab.shape[0] // 2
    return Image(array=case.to_units(noisy).astype(np.float32), spacing=spacing, modality=case.modality), -1


def run_mode(mode: str, model: DenoisingModel, case: Case, noisy: np.ndarray, noisy_slab: Optional[np.ndarray],
             seed: int = 0) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[str]]:
    """(denoised, uncertainty or None) of the test slice on the [0, 1] scale, and which filters made it alone
    (the pipeline's `filters_made_the_image`: the volumetric filter, the networks not running, or the
    correlated-noise filters, the networks' result only choosing where the noise is read), or None; `seed` seeds
    the samplers ("two-samples" takes seeds 0 and 1)."""
    image, index = model_input(case, noisy, noisy_slab, model.config.context_slices)
    # a slab: only its test slice is denoised, its neighbours serve as the 2.5D context
    where = dict(slice_axis=0, slice_range=(index, index + 1)) if index >= 0 else {}

    def pick(array: np.ndarray) -> np.ndarray:
        a = np.asarray(array, np.float64)
        return a[0] if index >= 0 else a

    if mode == "two-samples":
        return two_samples(*(run_mode("single", model, case, noisy, noisy_slab, seed=s) for s in (0, 1)))
    if mode.endswith("-unfused"):
        result = denoise_image(image, model, mode=mode[:-len("-unfused")], fusion=False, seed=seed, **where)
        return (pick(result.image.array) - case.offset) / case.scale, None, None
    result = denoise_image(image, model, mode=mode, seed=seed, **where)
    out = (pick(result.image.array) - case.offset) / case.scale
    spread = None if result.uncertainty is None else pick(result.uncertainty.array) / case.scale
    return out, spread, result.details.get("filters_made_the_image")


def two_samples(first: tuple, second: tuple) -> Tuple[np.ndarray, None, Optional[str]]:
    """The result of "two-samples" from `run_mode`'s results of "single" with seeds 0 and 1: their average."""
    return (first[0] + second[0]) / 2, None, first[2]


def measured_modes(modes: Sequence[str], model: DenoisingModel, case: Case, noisy: np.ndarray,
                   noisy_slab: Optional[np.ndarray]) -> Dict[str, tuple]:
    """{mode: (`run_mode`'s result, seconds, peak MiB)} of `modes` in order. Once a mode with fusion
    (FUSED_RUNS) finds that the volumetric filter made the image, the later ones whose groups are alike take its
    result, with its seconds per run of the pipeline times their runs: each would repeat that computation.
    Elsewhere "two-samples" after "single" takes its run as the first sample (seed 0) and adds its seconds."""
    results: Dict[str, tuple] = {}
    shared: Dict[bool, tuple] = {}  # groups alike: (result, seconds per run, MiB) of the volumetric filter's image
    for mode in modes:
        groups = deep_wiener_groups(FUSED_RUNS[mode][0]) if mode in FUSED_RUNS else None
        if groups in shared:
            result, seconds, mib = shared[groups]
            results[mode] = (result, seconds * FUSED_RUNS[mode][1], mib)
            continue
        if mode == "two-samples" and "single" in results:
            first, seconds, mib = results["single"]
            second, more, more_mib = measured(lambda: run_mode("single", model, case, noisy, noisy_slab, seed=1))
            peak = max((m for m in (mib, more_mib) if m is not None), default=None)  # None where unsampled
            results[mode] = (two_samples(first, second), seconds + more, peak)
            continue
        results[mode] = measured(lambda: run_mode(mode, model, case, noisy, noisy_slab))
        (_, _, made_by), seconds, mib = results[mode]
        if groups is not None and made_by == MADE_BY_VOLUMETRIC_FILTER:
            shared[groups] = (results[mode][0], seconds / FUSED_RUNS[mode][1], mib)
    return results


def fast_image_is_the_oracles(fast: tuple) -> bool:
    """Whether Fast's measured result (`measured_modes`) is the oracle's too: where the volumetric filter made it
    the networks did not run, and the oracle, Fast's student trained further, would run the same filter on the same
    slices (`pipeline.volumetric_filter_makes_the_image` reads the model's architecture, never its weights)."""
    (_, _, made_by), _, _ = fast
    return made_by == MADE_BY_VOLUMETRIC_FILTER
