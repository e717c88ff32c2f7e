"""DiffDenoise's modes as the benchmark runs them: the shipped default model for the image's modality.

The noisy slice goes through `denoise_image` in the scanner's units (HU for CT), exactly
as a user's image would, and comes back to the benchmark's [0, 1] scale for scoring.
"two-samples" averages two independent DDIM samples (seeds 0 and 1): the baseline that
SRDS's symmetric pair must beat. "full-unfused" and "single-unfused" are Full (SRDS) and one DDIM
sample without observation fusion and the filters after it: the samplers themselves, which shows what
SRDS's pair adds over one sample, and what fusion and the filters add. A volume's test slice goes to
the shipped 2.5D default where one is installed, with its neighbouring noisy slices.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from DiffDenoiseLib.imageio import Image
from DiffDenoiseLib.noise import noise_looks_correlated
from DiffDenoiseLib.pipeline import DenoisingModel, denoise_image
from DiffDenoiseLib.store import ModelStore, load_model

from benchmarks.suite import Case

MODES = ("bsn", "single-unfused", "single", "two-samples", "full-unfused", "full", "fast")


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


def run_mode(mode: str, model: DenoisingModel, case: Case, noisy: np.ndarray,
             noisy_slab: Optional[np.ndarray]) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[str]]:
    """(denoised, uncertainty or None) of the test slice on the [0, 1] scale, and which filters made it alone
    (the pipeline's `filters_made_the_image`: the volumetric filter, the networks not running, or the
    correlated-noise filters, the networks' result only choosing where the noise is read), or None."""
    image, index = model_input(case, noisy, noisy_slab, model.config.context_slices)
    # a slab: only its test slice is denoised, its neighbours serve as the 2.5D context
    where = dict(slice_axis=0, slice_range=(index, index + 1)) if index >= 0 else {}

    def pick(array: np.ndarray) -> np.ndarray:
        a = np.asarray(array, np.float64)
        return a[0] if index >= 0 else a

    if mode == "two-samples":
        runs = [denoise_image(image, model, mode="single", seed=s, **where) for s in (0, 1)]
        out = np.mean([pick(r.image.array) for r in runs], axis=0)
        return (out - case.offset) / case.scale, None, runs[0].details.get("filters_made_the_image")
    if mode.endswith("-unfused"):
        result = denoise_image(image, model, mode=mode[:-len("-unfused")], fusion=False, **where)
        return (pick(result.image.array) - case.offset) / case.scale, None, None
    result = denoise_image(image, model, mode=mode, **where)
    out = (pick(result.image.array) - case.offset) / case.scale
    spread = None if result.uncertainty is None else pick(result.uncertainty.array) / case.scale
    return out, spread, result.details.get("filters_made_the_image")
