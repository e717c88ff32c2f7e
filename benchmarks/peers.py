"""The peers DiffDenoise is measured against, each given what makes it strongest.

BM3D and BM4D get the true noise level (and, for correlated noise, its true power spectrum); under
signal-dependent noise (Poisson, Gamma, Rician) they run inside its variance-stabilising transform, told the
stabilised std, as their authors apply them to such data (the transform's unbiased inverse takes their result
back without bias). Non-local means, total variation and SimpleITK's curvature anisotropic diffusion get the
true sigma and have their one or two free parameters, and under signal-dependent noise whether they run inside
its transform, tuned on the image's training regions with the same noise (never on the test crop). Noise2Void
is trained for each condition on the noisy test slice and the noisy training regions, by CAREamics in a
separate Python environment. Optional peers whose package is missing are reported with the reason instead of a number.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from DiffDenoiseLib.metrics import psnr
from DiffDenoiseLib.noise import AnscombeTransform, LogTransform, RicianTransform, Transform

from benchmarks.suite import Noise, correlated_psd


@dataclass
class Condition:
    """What a peer may know about one noisy test slice."""

    noise: Noise
    sigma: float  # true noise std, measured as std(noisy - clean) over the slice
    slab: Optional[np.ndarray] = None  # noisy slab, test slice at its centre
    train_pairs: List[Tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (clean, noisy) regions


def numpy_compatible_bm4d():
    """bm3d 4.0 / bm4d 4.2 call np.trapz for coloured noise, which numpy 2.4 removed; np.trapezoid is the same."""
    if not hasattr(np, "trapz"):
        np.trapz = np.trapezoid


def psd_or_sigma(noise: Noise, sigma: float, shape) -> object:
    """bm3d/bm4d's `sigma_psd`: the true spectrum for correlated noise, else the std."""
    return correlated_psd(shape, noise.level) if noise.kind == "correlated" else sigma


def stabilising_transform(noise: Noise) -> Optional[Tuple[Transform, float]]:
    """The VST under which `noise` becomes near-Gaussian of one known std, and that std; None for additive noise.

    Poisson: the Anscombe transform (std 1 / (2 sqrt(lambda)) on its scale); Gamma: the log transform (std
    sqrt(trigamma(alpha)) over its normalisation, the library's default offset, not tuned on any crop); Rician:
    Foi's VST of the true sigma (std sigma). Each transform's `inverse_denoised` takes the result back without
    the bias that inverting a denoised estimate algebraically would leave."""
    if noise.kind == "poisson":
        return AnscombeTransform(noise.level), 1.0 / (2.0 * math.sqrt(noise.level))
    if noise.kind == "gamma":
        log = LogTransform(noise.level)
        trigamma = float(torch.special.polygamma(1, torch.tensor(float(noise.level), dtype=torch.float64)))
        return log, math.sqrt(trigamma) / log.norm
    if noise.kind == "rician":
        return RicianTransform(noise.level), noise.level
    return None


def stabilised(run: Callable[[np.ndarray, Condition], Optional[np.ndarray]]):
    """A Gaussian denoiser run inside the VST of signal-dependent noise (`stabilising_transform`), told the
    stabilised std, its result taken back by the unbiased inverse, as BM3D's and BM4D's authors apply them to
    Poisson, multiplicative and MR magnitude data; under additive noise it is run as it is. Measured on the quick
    benchmark's test crops (one draw), told the raw noise's global std instead: BM3D 2.2 dB lower on average under
    Gamma 100 (0.50 to 3.89 over the five images), 0.68 under Poisson 200 (0.07 to 1.32); BM4D 0.16 and 0.67
    lower on Colin27, 1.06 and 3.84 on the InVesalius CT; under Rician noise, which a magnitude denoiser leaves
    biased: BM4D 35.95 -> 36.34 dB on Colin27, BM3D 31.52 -> 32.00 on the shoulder MRI."""
    def inside_vst(noisy: np.ndarray, cond: Condition) -> Optional[np.ndarray]:
        vst = stabilising_transform(cond.noise)
        if vst is None:
            return run(noisy, cond)
        transform, std = vst
        inside = replace(cond, sigma=std, slab=None if cond.slab is None else transform.forward(cond.slab))
        out = run(transform.forward(noisy), inside)
        return None if out is None else transform.inverse_denoised(out)
    return inside_vst


def run_bm3d(noisy: np.ndarray, cond: Condition) -> np.ndarray:
    import bm3d

    numpy_compatible_bm4d()
    return np.asarray(bm3d.bm3d(noisy, sigma_psd=psd_or_sigma(cond.noise, cond.sigma, noisy.shape)), np.float64)


def run_bm4d(noisy: np.ndarray, cond: Condition) -> Optional[np.ndarray]:
    import bm4d

    if cond.slab is None:
        return None
    numpy_compatible_bm4d()
    out = bm4d.bm4d(cond.slab, sigma_psd=psd_or_sigma(cond.noise, cond.sigma, cond.slab.shape))
    return np.asarray(out, np.float64)[cond.slab.shape[0] // 2]


def tuned(denoise: Callable[[np.ndarray, float, dict], np.ndarray], grid: Dict[str, Sequence]):
    """A peer whose parameters, and under signal-dependent noise whether it runs inside the noise's VST
    (`stabilising_transform`), are chosen by mean PSNR on the training pairs, then applied to the test slice.
    The transform is chosen as the parameters are, not imposed: on the quick run's test crops the choice gained up
    to 3.2 dB (the curvature diffusion under the shoulder MRI's Gamma noise) and lost up to 0.85 (TV under its
    Rician noise) where the training regions' preference did not carry over."""

    def run(noisy: np.ndarray, cond: Condition) -> np.ndarray:
        vst = stabilising_transform(cond.noise)
        settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        options = list(itertools.product([None] if vst is None else [None, vst], settings))

        def apply(way: Optional[Tuple[Transform, float]], setting: dict, image: np.ndarray) -> np.ndarray:
            if way is None:
                return denoise(image, cond.sigma, setting)
            transform, std = way
            return transform.inverse_denoised(denoise(transform.forward(image), std, setting))

        if len(options) > 1 and cond.train_pairs:
            scores = [np.mean([psnr(c, apply(way, setting, n), data_range=1.0) for c, n in cond.train_pairs])
                      for way, setting in options]
            chosen = options[int(np.argmax(scores))]
        else:
            chosen = options[0]
        return apply(*chosen, noisy)

    return run


def nl_means(noisy: np.ndarray, sigma: float, p: dict) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(noisy, h=p["h"] * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True)


def total_variation(noisy: np.ndarray, sigma: float, p: dict) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(noisy, weight=p["weight"] * sigma)


def curvature_diffusion(noisy: np.ndarray, sigma: float, p: dict) -> np.ndarray:
    """Slicer's Filtering > Denoising > Curvature Anisotropic Diffusion (time step stable in 2D)."""
    image = sitk.GetImageFromArray(np.asarray(noisy, np.float64))
    out = sitk.CurvatureAnisotropicDiffusion(image, timeStep=0.0625, conductanceParameter=p["conductance"],
                                            numberOfIterations=p["iterations"])
    return sitk.GetArrayFromImage(out)


@dataclass
class Peer:
    name: str
    run: Callable[[np.ndarray, Condition], Optional[np.ndarray]]
    package: Optional[str] = None  # import name of an optional package


PEERS = (
    Peer("bm3d", stabilised(run_bm3d), "bm3d"),
    Peer("bm4d", stabilised(run_bm4d), "bm4d"),
    Peer("nl-means", tuned(nl_means, {"h": (0.6, 0.8, 1.0, 1.3)}), "skimage"),
    Peer("tv", tuned(total_variation, {"weight": (0.5, 1.0, 2.0, 4.0)}), "skimage"),
    Peer("sitk-curvature", tuned(curvature_diffusion, {"iterations": (5, 10, 20), "conductance": (0.5, 1.0, 2.0)})),
)


def available_peers(peers: Sequence[Peer] = PEERS) -> Tuple[List[Peer], Dict[str, str]]:
    """The peers that can run here, and why the others cannot."""
    ready, missing = [], {}
    for peer in peers:
        if peer.package and importlib.util.find_spec(peer.package) is None:
            missing[peer.name] = f"the optional package '{peer.package}' is not installed (pip install -e .[benchmark])"
        else:
            ready.append(peer)
    return ready, missing


N2V_WORKER = Path(__file__).with_name("careamics_n2v.py")


def noise2void(python: str, steps: int, worker: Path = N2V_WORKER) -> Peer:
    """Noise2Void trained for `steps` batches on each condition by `worker` run with `python` (CAREamics)."""

    def run(noisy: np.ndarray, cond: Condition) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="n2v-") as folder:
            inputs, output = Path(folder) / "input.npz", Path(folder) / "output.npy"
            np.savez(inputs, test=noisy, **{f"train_{i}": n for i, (_, n) in enumerate(cond.train_pairs)})
            done = subprocess.run([python, str(worker), str(inputs), str(output), "--steps", str(steps)],
                                  capture_output=True, text=True)
            if done.returncode != 0 or not output.exists():
                tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
                raise RuntimeError(f"Noise2Void with {python} failed (exit {done.returncode}): {tail}")
            return np.load(output, allow_pickle=False)

    return Peer("n2v", run)


def noise2void_unavailable(python: Optional[str]) -> Optional[str]:
    """Why Noise2Void cannot run with `python`, or None when it can."""
    if not python:
        return ("not run: Noise2Void needs a Python environment with careamics, given as --n2v-python "
                "(or DIFFDENOISE_N2V_PYTHON); see benchmarks/README.md")
    try:
        check = subprocess.run([python, "-c", "import careamics"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"not run: {python} could not be started ({error})"
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["no message"])[-1]
        return f"not run: careamics does not import with {python} ({last})"
    return None
