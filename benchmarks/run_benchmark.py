"""Benchmark DiffDenoise against its peers on real images with synthetic noise; one command writes it all.

    python benchmarks/run_benchmark.py [--quick | --full] [--out benchmarks/results]
                                       [--images NAME ...] [--noises LABEL ...] [--no-figures]
                                       [--n2v-python PYTHON_WITH_CAREAMICS]

Writes results.json (every slice, method and metric), results.md (tables and the goals of
the benchmark, each checked against the numbers) and PNG figures to --out. See
benchmarks/README.md for the data, the noise suite, the methods and the two modes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from DiffDenoiseLib.atomic import replaced_when_done  # noqa: E402
from DiffDenoiseLib.metrics import flat_region_bias, gradient_magnitude, method_noise_stats, psnr, ssim  # noqa: E402
from DiffDenoiseLib.noise import noise_variance_curve  # noqa: E402
from DiffDenoiseLib.wiener import CUBE_SLICE_REACH  # noqa: E402

from benchmarks import ours, report  # noqa: E402
from benchmarks.measure import measured  # noqa: E402
from benchmarks.oracle import train_oracle  # noqa: E402
from benchmarks.peers import Condition, available_peers, noise2void, noise2void_unavailable  # noqa: E402
from benchmarks.suite import Case, Noise, build_cases, noises_for  # noqa: E402

MODES = {
    "quick": {"oracle_steps": 100, "oracle_patch": 48, "tuning_pairs": 2, "tuning_crop": 96, "n2v_steps": 150,
              "bias_pairs": 2},
    "full": {"oracle_steps": 3000, "oracle_patch": 64, "tuning_pairs": 4, "tuning_crop": 192, "n2v_steps": 3000,
             "bias_pairs": 4},
}
BIAS_MODES = ("full", "fast")  # with the peers and the input, the methods whose CT flat-tissue bias is measured
FIGURE_NOISES = ("gaussian 25/255", "poisson 200", "correlated 1.2", "rician 0.05")


def masks(clean: np.ndarray, body: np.ndarray):
    """Foreground (body) mask and a flat-tissue mask: the smoothest quarter of the body, eroded away from edges.

    Smoothness is the gradient of the clean image smoothed at 2 pixels, so that texture and the
    scanner noise a clean CT still carries do not break the flat tissue into specks.
    """
    fg = np.asarray(body, dtype=bool)
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(clean), 2.0))
    g = gradient_magnitude(smooth)
    flat = fg & (g <= np.percentile(g[fg], 25)) if fg.any() else fg
    flat = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(flat.astype(np.uint8)), [2, 2])) > 0
    return fg, (flat if flat.sum() >= 100 else None)


def scores(noise: Noise, clean: np.ndarray, noisy: np.ndarray, out: np.ndarray, fg) -> Dict[str, Optional[float]]:
    use_fg = fg if fg.sum() >= 100 else None
    return {
        "psnr": psnr(clean, out, data_range=1.0),
        "ssim": ssim(clean, out, data_range=1.0),
        "psnr_fg": psnr(clean, out, data_range=1.0, mask=use_fg),
        "ssim_fg": ssim(clean, out, data_range=1.0, mask=use_fg),
        # the method noise in units of the noise's own std, so that signal-dependent noise removed exactly scores 0
        "edge_correlation": method_noise_stats(noisy, out, clean, noise_std=noise.std(clean))["edge_correlation"],
    }


def flat_bias_over_pairs(case: Case, clean: np.ndarray, flat, draws: List[Dict[str, np.ndarray]]
                         ) -> Dict[str, List[float]]:
    """Each method's flat-tissue shift against the clean image (HU for CT), one value per antithetic pair.

    One draw's shift carries that draw's own patch mean: under correlated noise it moved Full's flat patch by
    up to 16 HU from draw to draw (sd), which hides a 1 HU bias. The mean over a pair (a draw and its sign
    flipped) cancels every part of the shift that is odd in the noise; measured, its sd was 0.06 to 1.4 HU.
    `draws` holds {method: output on the [0, 1] scale} per draw, each draw's twin right after it; a method
    missing from any draw is left out.
    """
    methods = [m for m in draws[0] if all(m in d for d in draws)]
    return {m: [float(np.mean([flat_region_bias(case.to_units(clean), case.to_units(d[m]), flat) for d in pair]))
                for pair in zip(draws[::2], draws[1::2])] for m in methods}


def training_pairs(case: Case, noise: Noise, rng, count: int, crop: int):
    pairs = []
    for region in case.train[:count]:
        clean = region[:crop, :crop]
        pairs.append((clean, noise.apply(clean, rng)))
    return pairs


def antithetic_draws(case: Case, noise: Noise, s_index: int, noisy: np.ndarray, noisy_slab: Optional[np.ndarray],
                     rng: np.random.Generator, pairs: int) -> List[tuple]:
    """(noisy, slab or None) of the main draw's twin, then of `pairs` - 1 further draws, each followed by its twin."""
    clean = case.clean[s_index] if case.slabs is None else case.slabs[s_index]
    drawn = [noisy if noisy_slab is None else noisy_slab]
    drawn += [noise.apply(clean, rng) for _ in range(pairs - 1)]
    images = [image for one in drawn for image in (one, noise.antithetic(clean, one))][1:]
    return [(image, None) if case.slabs is None else (image[image.shape[0] // 2], image) for image in images]


def ct_flat_bias(case: Case, noise: Noise, n_index: int, s_index: int, flat, main_draw: tuple, outputs: dict,
                 peers, tuning: list, settings: dict, model_cache: dict) -> Dict[str, List[float]]:
    """The flat-tissue bias (HU) of the input, every peer and BIAS_MODES over `settings["bias_pairs"]` antithetic
    pairs, the first made of the main draw (whose `outputs` are reused) and its twin."""
    clean = case.clean[s_index]

    def outputs_of(noisy: np.ndarray, slab: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
        cond = Condition(noise, float(np.std(noisy - clean)), slab, tuning)
        found = {"noisy": noisy, **{p.name: p.run(noisy, cond) for p in peers}}
        _, model = ours.default_model(case.modality, noisy, slab, model_cache)
        found.update({m: result[0][0] for m, result in ours.measured_modes(BIAS_MODES, model, case, noisy,
                                                                            slab).items()})
        return {m: out for m, out in found.items() if out is not None}

    rng = np.random.default_rng([2027, sum(map(ord, case.name)), n_index, s_index])
    draws = [{m: outputs[m][0] for m in ["noisy", *(p.name for p in peers), *BIAS_MODES] if m in outputs}]
    draws += [outputs_of(*draw) for draw in antithetic_draws(case, noise, s_index, *main_draw, rng,
                                                             settings["bias_pairs"])]
    return flat_bias_over_pairs(case, clean, flat, draws)


def run_case(case: Case, noises: List[Tuple[int, Noise]], peers, settings: dict, model_cache: dict, log) -> tuple:
    """Every method on every test slice of one image; returns (rows, figure panels).

    `noises` holds (index in the image's whole noise suite, noise): the index seeds the draws, so a run limited to
    some noises (--noises) draws exactly what the whole run draws for them."""
    rows, figures = [], []
    for n_index, noise in noises:
        rng = np.random.default_rng([2026, sum(map(ord, case.name)), n_index])
        started = time.perf_counter()
        # per model: the noise picks the model, and the model the oracle's start
        oracles, oracle_s, bias_s = {}, 0.0, 0.0
        pairs = training_pairs(case, noise, rng, settings["tuning_pairs"], settings["tuning_crop"])
        for s_index, clean in enumerate(case.clean):
            if case.slabs is not None:
                noisy_slab = noise.apply(case.slabs[s_index], rng)
                noisy = noisy_slab[noisy_slab.shape[0] // 2]
            else:
                noisy_slab, noisy = None, noise.apply(clean, rng)
            name, model = ours.default_model(case.modality, noisy, noisy_slab, model_cache)
            cond = Condition(noise, float(np.std(noisy - clean)), noisy_slab, pairs)
            fg, flat = masks(clean, case.body[s_index])
            outputs, row_of = {}, {}

            def record(method: str, measured_call: tuple, model_name: Optional[str] = None) -> None:
                (out, extra, made_by), seconds, mib = measured_call
                if out is None:
                    return
                outputs[method] = (out, extra)
                row_of[method] = {"image": case.name, "modality": case.modality, "unit": case.unit,
                                  "noise": noise.label, "slice": s_index, "method": method, "seconds": seconds,
                                  "peak_mib": mib, "model": model_name, "filters_made_the_image": made_by,
                                  **scores(noise, clean, noisy, out, fg)}
                rows.append(row_of[method])

            record("noisy", measured(lambda: (noisy, None, None)))
            for peer in peers:
                record(peer.name, measured(lambda: (peer.run(noisy, cond), None, None)))
            modes = ours.measured_modes(ours.MODES, model, case, noisy, noisy_slab)
            for mode, result in modes.items():
                record(mode, result, name)
            if ours.fast_image_is_the_oracles(modes["fast"]):  # its networks would not run: nothing to train
                record("oracle", modes["fast"], name)
            else:
                if name not in oracles:
                    oracles[name], seconds, _ = measured(lambda: train_oracle(
                        model, case, noise, settings["oracle_steps"], patch=settings["oracle_patch"]))
                    oracle_s += seconds
                record("oracle", measured(lambda: ours.run_mode("fast", oracles[name], case, noisy, noisy_slab)),
                       name)
            if case.unit == "HU" and flat is not None:
                bias_started = time.perf_counter()
                for method, values in ct_flat_bias(case, noise, n_index, s_index, flat, (noisy, noisy_slab),
                                                   outputs, peers, pairs, settings, model_cache).items():
                    row_of[method]["flat_bias_pairs"] = values
                bias_s += time.perf_counter() - bias_started
            if s_index == 0 and noise.label in FIGURE_NOISES:
                made_by = row_of["full"]["filters_made_the_image"] if "full" in row_of else None
                figures.append(report.figure_panels(case.name, noise.label, clean, noisy, outputs,
                                                    [p.name for p in peers], made_by))
        log(f"{case.name:20s} {noise.label:16s} {time.perf_counter() - started:6.1f} s "
            f"(oracle training {oracle_s:.1f} s" + (f", CT bias pairs {bias_s:.1f} s)" if bias_s else ")"))
    return rows, figures


def selected_noises(modality: str, quick: bool, labels: Optional[List[str]]) -> List[Tuple[int, Noise]]:
    """(index in the modality's whole noise suite, noise) for the noises labelled `labels` (all if none)."""
    return [(i, n) for i, n in enumerate(noises_for(modality, quick)) if not labels or n.label in labels]


def reference_noise_std(clean: np.ndarray) -> float:
    """The noise std the blind noise curve reads on the clean references themselves ([0, 1] scale): real scans
    carry their own noise, which a blind denoiser counts and removes and PSNR against them counts as lost."""
    return float(np.sqrt(np.mean(noise_variance_curve(clean)[1])))


def neighbour_offset(case: Case, s_index: int, flat: np.ndarray, reach: int = CUBE_SLICE_REACH) -> float:
    """How far (in the image's units) the flat-tissue patch's mean in the `reach` slices either side of a volume's
    test slice lies from the test slice's own: a method that pools those slices (BM4D, the volumetric filter)
    reads that much as bias against the test slice, whose own anatomy and scanner noise set its patch mean."""
    slab = case.to_units(case.slabs[s_index])
    mid = slab.shape[0] // 2
    around = [slab[k][flat].mean() for k in range(max(0, mid - reach), min(len(slab), mid + reach + 1)) if k != mid]
    return float(np.mean(around) - slab[mid][flat].mean())


def described(case: Case) -> dict:
    """What the report says of an image, measured once when its conditions are done: its source and units, the
    reference's own noise, the voxels of each test slice's flat-tissue patch (0 where it has none) and, for a
    volume, how far that patch's mean in the neighbouring slices lies from the test slice's."""
    flats = [masks(clean, body)[1] for clean, body in zip(case.clean, case.body)]
    offsets = None if case.slabs is None else [None if flat is None else neighbour_offset(case, i, flat)
                                               for i, flat in enumerate(flats)]
    return {"name": case.name, "modality": case.modality, "unit": case.unit, "source": case.source,
            "test_shape": list(case.clean.shape), "slab_depth": None if case.slabs is None else case.slabs.shape[1],
            "unit_range": [case.offset, case.offset + case.scale], "own_noise_std": reference_noise_std(case.clean),
            "flat_pixels": [0 if flat is None else int(flat.sum()) for flat in flats], "neighbour_offsets": offsets}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="128x128 crops, one test slice, seven noise settings "
                      "(the default)")
    mode.add_argument("--full", action="store_true", help="192x192 crops, three test slices per volume, the whole "
                      "noise suite, a longer oracle (meant for a GPU machine)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--images", nargs="*", help="only these images (names as in results.json)")
    parser.add_argument("--noises", nargs="*", help="only these noise settings (labels, e.g. 'gaussian 25/255')")
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--n2v-python", default=os.environ.get("DIFFDENOISE_N2V_PYTHON"),
                        help="a Python interpreter with careamics, to run Noise2Void (benchmarks/README.md)")
    args = parser.parse_args(argv)
    quick = not args.full
    settings = MODES["quick" if quick else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda message: print(message, flush=True)  # noqa: E731

    started = time.perf_counter()
    cases, missing_images = build_cases(quick)
    if args.images:
        cases = [c for c in cases if c.name in args.images]
    peers, missing_peers = available_peers()
    n2v_missing = noise2void_unavailable(args.n2v_python)
    if n2v_missing:
        missing_peers["n2v"] = n2v_missing
    else:
        peers.append(noise2void(args.n2v_python, settings["n2v_steps"]))
    rows, figures, models = [], [], {}

    def write(images: List[dict]) -> dict:
        """Everything measured so far: a long run leaves usable results after every image."""
        results = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mode": "quick" if quick else "full", "settings": settings, "machine": machine(),
            "wall_seconds": round(time.perf_counter() - started, 1), "images": images,
            "missing_images": missing_images, "not_run": missing_peers,
            "models": {name: report.model_summary(model) for name, model in models.values()},
            "rows": rows,
        }
        with replaced_when_done(out / "results.json") as tmp:
            tmp.write_text(json.dumps(results, indent=1, allow_nan=False, default=float) + "\n")
        with replaced_when_done(out / "results.md") as tmp:
            tmp.write_text(report.markdown(results))
        return results

    images: List[dict] = []
    for case in cases:
        case_rows, case_figures = run_case(case, selected_noises(case.modality, quick, args.noises), peers,
                                           settings, models, log)
        rows += case_rows
        figures += case_figures
        images.append(described(case))
        write(images)
    if not args.no_figures:
        report.write_figures(figures, out / "figures")
    results = write(images)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'} in {results['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
