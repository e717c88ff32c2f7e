"""Train the shipped default models with the project's own `diffdenoise train` command.

All are trained self-supervised: the networks only ever see noisy images. The clean
images serve twice, outside training: to make realistic noisy training data, and to
calibrate the truncated SRDS start on training slices and measure the card's quality
figures on slices the training never saw.

    python scripts/train_default_models.py [--only mr|ct|correlated] [--context-slices K] [--scale 1.0]
                                           [--threads 1] [--device cpu|cuda] [--evaluate-only]

  mr-brain-default  Colin27 T1 brain MRI (Debian mricron-data): Rician noise at three levels,
                    Poisson and Gamma noise, so one model covers the levels users meet
  ct-head-default   InVesalius head CT (Debian invesalius-examples; real scanner noise)
                    with added Gaussian noise of 20 to 300 HU and Poisson noise
  correlated-noise-default  both volumes with spatially correlated noise (Gaussian kernels of
                    0.5 to 1.6 pixels) and a blind spot of radius 3: for any modality whose
                    noise looks correlated (noise.noise_looks_correlated), which the other
                    models leave in

With `--context-slices K` (K > 0) the networks also see K neighbouring slices on each
side (2.5D) and the models are named mr-brain-2.5d and ct-head-2.5d: the defaults for
volumes, while the 2D models serve single images.
The models are written to DiffDenoiseLib/models/<name>/ (card.json + weights).
`--scale` multiplies every stage's step count (0.05 for a smoke run). `--t-start T` and
`--no-evaluation` skip the post-training t0 sweep and the card's evaluation (each denoises
the centre slice of every evaluation slab, in each mode and at each noise level).
`--student-steps N` sets the student's steps alone; with `--continue-student` the shipped
model's student trains N more steps while its blind-spot and diffusion networks stay as they are.
`--evaluate-only` trains nothing: it scores the shipped model again with today's pipeline (the
filters after the networks change what each mode gives) and rewrites only the card's scores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DiffDenoiseLib import datasets  # noqa: E402
from DiffDenoiseLib.device import select_device  # noqa: E402
from DiffDenoiseLib.imageio import Image, write_image  # noqa: E402
from DiffDenoiseLib.metrics import psnr, ssim  # noqa: E402
from DiffDenoiseLib.noise import add_noise  # noqa: E402
from DiffDenoiseLib.normalization import HIGH_PERCENTILE, LOW_PERCENTILE  # noqa: E402
from DiffDenoiseLib.pipeline import denoise_image  # noqa: E402
from DiffDenoiseLib.store import load_model, read_card, save_model, write_card  # noqa: E402

SHIPPED = ROOT / "DiffDenoiseLib" / "models"
COLIN27 = "Colin27 T1 template (Debian mricron-data)"
INVESALIUS = "InVesalius example head CT (Debian invesalius-examples)"
CORRELATED_BLIND_SPOT_RADIUS = 3
# 100-200 bracket the best truncated start of every model trained so far (140 for both 2D defaults);
# the wider sweep cost over 10 min of CPU per 2.5D model for differences of a few hundredths of a dB.
T_START_CANDIDATES = (100, 140, 200)


def mr_recipe():
    clean = datasets.colin27()
    top = float(np.percentile(clean.array, 99.5))
    unit = clean.array.astype(np.float64) / top
    rng = np.random.default_rng(27)
    levels = [("rician", 0.02), ("rician", 0.05), ("rician", 0.10), ("poisson", 200.0), ("gamma", 100.0)]
    noisy = [add_noise(unit, kind, level, rng) * top for kind, level in levels]
    return {
        "name": "mr-brain-default", "sources": [(clean, noisy)], "source": COLIN27,
        "levels": [f"{kind} {level:g} (on the 0-1 scale)" for kind, level in levels],
        "default_for": ["MR", "OT", "CR", "DX", "XA", "MG", "PT", "NM", "US", None],
        "description": "Brain MRI (T1) and other non-CT images; trained on Colin27 with Rician, Poisson and Gamma noise.",
    }


def ct_recipe():
    clean = datasets.invesalius_head_ct()
    rng = np.random.default_rng(42)
    hu = clean.array.astype(np.float64)
    sigmas = (20.0, 60.0, 150.0, 300.0)
    noisy = [hu + rng.normal(0, s, hu.shape) for s in sigmas]
    low, high = np.percentile(hu, [LOW_PERCENTILE, HIGH_PERCENTILE])
    unit = (hu - low) / (high - low)
    noisy.append(add_noise(unit, "poisson", 200.0, rng) * (high - low) + low)
    return {
        "name": "ct-head-default", "sources": [(clean, noisy)], "source": INVESALIUS,
        "levels": [f"scanner noise + gaussian {s:g} HU" for s in sigmas]
                  + ["scanner noise + Poisson lambda 200 on the 0.5-99.5 percentile scale"],
        "default_for": ["CT"],
        "description": "CT; trained on the InVesalius head CT (real scanner noise) with added Gaussian and Poisson noise.",
    }


def correlated_recipe():
    """Both volumes with spatially correlated Gaussian noise (kernels of 0.5 to 1.6 pixels), for a
    wider blind spot: the noise of CT reconstruction kernels and of denoised or resampled scans."""
    kernels = ((0.5, 0.05), (0.8, 0.08), (1.2, 0.1), (1.6, 0.06))
    rng = np.random.default_rng(7)
    sources = []
    for clean in (datasets.colin27(), datasets.invesalius_head_ct()):
        values = clean.array.astype(np.float64)
        low, high = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE])
        unit = (values - low) / (high - low)
        sources.append((clean, [add_noise(unit, "correlated", k, rng, sigma=s) * (high - low) + low
                                for k, s in kernels]))
    return {
        "name": "correlated-noise-default", "sources": sources, "source": f"{COLIN27} and {INVESALIUS}",
        "levels": [f"correlated gaussian, kernel {k:g} px, std {s:g} (on the 0.5-99.5 percentile scale)"
                   for k, s in kernels],
        "default_for": [], "default_for_noise": "correlated",
        "network": {"blind_spot_radius": CORRELATED_BLIND_SPOT_RADIUS},
        # the diffusion stage on 48 slices of each of the eight volumes: the blind-spot estimate of
        # all 1156 costs six network passes each (25 minutes on two CPU threads for the 2.5D model)
        "training": {"diffusion_slices": 48},
        # AP-BSN's inference already averages six passes; eight views of each would make Full 8 times slower
        "sampling": {"self_ensemble": 1},
        "description": "Any modality with spatially correlated noise, picked without --model when the noise looks "
                       "so; a blind spot of 7x7 pixels. Trained on Colin27 and the InVesalius head CT.",
    }


def train_config(scale: float, context: int, student_steps: Optional[int] = None,
                 student_slices: Optional[int] = None) -> dict:
    steps = {"bsn_steps": 2500, "diffusion_steps": 2000, "student_steps": 900}
    return {
        "network": {"context_slices": context, "bsn_width": 48, "bsn_depth": 5, "unet_base": 32,
                    "unet_mults": [1, 2, 2], "student_width": 32},
        "training": {**{k: max(2, int(v * scale)) for k, v in steps.items()}, "batch_size": 16,
                     "student_slices": 24, "checkpoint_seconds": 60,
                     **({"student_steps": student_steps} if student_steps else {}),
                     **({"student_slices": student_slices} if student_slices else {})},
        "sampling": {"steps": 5, "pairs": 1, "t_start": 100},
        "transform": "none",
    }


def split_slices(n: int):
    """Every fourth slice of the middle 60 % for evaluation; calibration uses the others."""
    middle = np.arange(int(n * 0.2), int(n * 0.8))
    return middle[1::4][:8], middle[::4][:6]


def slab(image: Image, array: np.ndarray, index: int, context: int) -> Tuple[Image, int]:
    """The test slice with `context` neighbours on each side (a 2D image when 0), and its index in the result."""
    if context == 0:
        return Image(array=np.ascontiguousarray(array[index]).astype(np.float32), spacing=image.spacing[:2],
                     origin=image.origin[:2], direction=(1.0, 0.0, 0.0, 1.0), modality=image.modality), -1
    stack = np.ascontiguousarray(array[index - context:index + context + 1]).astype(np.float32)
    return Image(array=stack, spacing=image.spacing, origin=image.origin, direction=image.direction,
                 modality=image.modality), context


def score(clean: np.ndarray, estimate: np.ndarray, data_range: float) -> dict:
    return {"psnr": round(psnr(clean, estimate, data_range=data_range), 2),
            "ssim": round(ssim(clean, estimate, data_range=data_range), 4)}


def evaluate(model, recipe, part, modes, t_start=-1, device=None):
    """Mean PSNR/SSIM per mode over the evaluation (part 0) or calibration (part 1) slices of every noise level,
    denoised on `device` (the CPU by default)."""
    results = {m: [] for m in ("noisy",) + tuple(modes)}
    context = model.config.context_slices
    for source, noisy_arrays in recipe["sources"]:
        clean = source.array.astype(np.float64)
        data_range = float(np.percentile(clean, 99.9) - np.percentile(clean, 0.1))
        for noisy, i in itertools.product(noisy_arrays, split_slices(clean.shape[0])[part]):
            image, index = slab(source, noisy, i, context)
            pick = (lambda a: a[index]) if index >= 0 else (lambda a: a)
            results["noisy"].append(score(clean[i], pick(image.array), data_range))
            where = dict(slice_axis=0, slice_range=(index, index + 1)) if index >= 0 else {}
            for mode in modes:
                out = denoise_image(image, model, mode=mode, t_start=t_start, device=device, **where)
                results[mode].append(score(clean[i], out.image.array.reshape(clean[i].shape), data_range))
    return {m: {k: round(float(np.mean([r[k] for r in rs])), 3) for k in ("psnr", "ssim")} for m, rs in results.items()}


def run_training(recipe, args, store: Path, work: Path, log_path: Path):
    config = train_config(args.scale, args.context_slices, args.student_steps, args.student_slices)
    config["network"].update(recipe.get("network", {}))
    config["training"].update(recipe.get("training", {}))
    config["sampling"].update(recipe.get("sampling", {}))
    config_path = work / f"{recipe['name']}.json"
    if args.continue_student:  # an adapted model keeps its architecture, transform and sampling
        config = {"training": config["training"]}
    config_path.write_text(json.dumps(config, indent=2))
    inputs = []
    noisy_images = [(source, noisy) for source, arrays in recipe["sources"] for noisy in arrays]
    for i, (source, noisy) in enumerate(noisy_images):
        path = work / f"{recipe['name']}-{i}.nrrd"
        write_image(Image(array=noisy.astype(np.float32), spacing=source.spacing, origin=source.origin,
                          direction=source.direction, modality=source.modality), path)
        inputs.append(str(path))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    command = train_command(recipe["name"], inputs, store, config_path, args.device, args.continue_student)
    with open(log_path, "a") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return config


def train_command(name: str, inputs, store: Path, config_path: Path, device: str, continue_student: bool) -> list:
    """The `diffdenoise train` command of one model: from scratch, or the shipped model's student trained further."""
    command = [sys.executable, "-m", "DiffDenoiseLib", "train", *inputs, "--name", name, "--store", str(store),
               "--config", str(config_path), "--device", device, "--json"]
    if continue_student:
        command += ["--from", str(SHIPPED / name), "--stages", "student"]
    return command


def continued_stages(before: dict, after: dict) -> dict:
    """The stage records of a model whose student was trained further: the earlier networks' as they were."""
    stages = dict(before["training"]["stages"])
    first, more = stages["student"], after["training"]["stages"]["student"]
    earlier = first.get("history", f"{first['steps']} steps" + (f" ({first['targets']})" if "targets" in first else ""))
    learned = f" ({more['targets']})" if "targets" in more else ""
    stages["student"] = {"steps": first["steps"] + more["steps"], "seconds": round(first["seconds"] + more["seconds"], 1),
                         "final_loss": more["final_loss"],
                         "history": f"{earlier}, then {more['steps']} more from that student on the same training "
                                    f"images{learned}"}
    return stages


def build(recipe, args, device):
    store = Path(args.store)
    work = Path(args.work) / recipe["name"]
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    config = run_training(recipe, args, store, work, work / "train.log")
    seconds = time.time() - started
    model = load_model(store / recipe["name"])

    if args.t_start is None:
        scores = {t: evaluate(model, recipe, 1, ("full",), t_start=t, device=device)["full"]["psnr"]
                  for t in T_START_CANDIDATES}
        best = max(scores, key=scores.get)
    else:
        scores, best = {}, args.t_start
    model.sampling.t_start = int(best)
    model.card["sampling"]["t_start"] = int(best)
    metrics = None if args.no_evaluation else evaluate(model, recipe, 0, ("bsn", "single", "full", "fast"),
                                                       device=device)

    card = model.card
    if args.continue_student:
        before = read_card(SHIPPED / recipe["name"])
        card["training"]["stages"] = continued_stages(before, card)
        card["training"]["config"] = before["training"]["config"]  # the networks' own; the student's run is in the recipe
        if "history" in before["training"]:
            card["training"]["history"] = before["training"]["history"]
        if "note" in before["training"]:  # a hand-written note on the networks kept as they were
            card["training"]["note"] = before["training"]["note"]
        card["started_from"] = None
        config = {**before["training"]["recipe"], "continued_student": config["training"]}
        seconds += before["training"]["wall_seconds"]
    # a student trained further keeps the model's description, which may say more than the recipe's
    card["description"] = before["description"] if args.continue_student else recipe["description"]
    card["default_for"] = recipe["default_for"]
    if "default_for_noise" in recipe:
        card["default_for_noise"] = recipe["default_for_noise"]
    card["training_data"]["source"] = recipe["source"]
    card["training_data"]["noise"] = recipe["levels"]
    card["training"]["wall_seconds"] = round(seconds, 1)
    card["training"]["recipe"] = config
    card["training"]["script"] = "scripts/train_default_models.py"
    card["training"]["command"] = " ".join(["python scripts/train_default_models.py", *sys.argv[1:]])
    if args.continue_student:
        earlier = before["training"].get("command", "an earlier run of this script (its command was not recorded)")
        card["training"]["command"] = f"{earlier}, then {card['training']['command']}"
    card["metrics"] = {
        "evaluation": ("mean over held-out slices of every training noise level, against the clean image"
                       if metrics else "not evaluated at training time (--no-evaluation); see the benchmark"),
        "t_start_calibration_psnr": ({str(t): s for t, s in scores.items()} if scores
                                     else f"not calibrated: --t-start {best} was given"),
        "scores": metrics,
    }
    calibrated = before["metrics"]["t_start_calibration_psnr"] if args.continue_student else None
    if isinstance(calibrated, dict) and not scores and best == before["sampling"]["t_start"]:
        card["metrics"]["t_start_calibration_psnr"] = calibrated  # its networks are the ones calibrated
    target = SHIPPED / recipe["name"]
    save_model(model, target)
    print(json.dumps({"model": recipe["name"], "seconds": round(seconds), "t_start": best, "metrics": metrics}))


def rescore(recipe, device=None) -> None:
    """The shipped model's card scores measured again with today's pipeline, its networks as they are."""
    folder = SHIPPED / recipe["name"]
    metrics = evaluate(load_model(folder), recipe, 0, ("bsn", "single", "full", "fast"), device=device)
    card = read_card(folder)
    card["metrics"]["scores"] = metrics
    card["metrics"]["evaluation"] = ("mean over held-out slices of every training noise level, against the clean "
                                     f"image (measured {time.strftime('%Y-%m-%d')} with that day's pipeline: "
                                     "--evaluate-only)")
    write_card(folder, card)
    print(json.dumps({"model": recipe["name"], "metrics": metrics}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("mr", "ct", "correlated"))
    parser.add_argument("--context-slices", type=int, default=0, help="neighbouring slices on each side (2.5D)")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--student-steps", type=int, help="the student's steps, instead of 900 times --scale: "
                        "the student is the cheapest stage and the one Fast mode runs")
    parser.add_argument("--student-slices", type=int, help="slices per volume that get Full's distillation "
                        "targets, instead of 24 (under correlated noise a 2.5D model's targets also need SRDS on "
                        "the slices either side of each)")
    parser.add_argument("--continue-student", action="store_true", help="train the shipped model's student "
                        "--student-steps more steps from where it is, keeping its other networks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the networks train and the card's scores are "
                        "measured: cpu (the default, where the shipped models were trained, so a command on a card "
                        "means the same everywhere), cuda, cuda:N, mps or auto")
    parser.add_argument("--t-start", type=int, help="use this truncated SRDS start instead of calibrating it")
    parser.add_argument("--no-evaluation", action="store_true", help="leave the card's quality figures out")
    parser.add_argument("--evaluate-only", action="store_true", help="train nothing: score the shipped model "
                        "again with today's pipeline and rewrite its card's scores")
    parser.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "diffdenoise-default-models"))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "diffdenoise-default-work"))
    args = parser.parse_args()
    if args.continue_student and not args.student_steps:
        parser.error("--continue-student needs --student-steps")
    try:  # before any volume is written or trained on
        device, _ = select_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    recipes = {"mr": mr_recipe, "ct": ct_recipe, "correlated": correlated_recipe}
    for key in ([args.only] if args.only else list(recipes)):
        recipe = recipes[key]()
        if args.context_slices:
            recipe["name"] = recipe["name"].replace("-default", "-2.5d")
            seen = f"for volumes ({2 * args.context_slices} neighbouring slices seen)"
            description = recipe["description"]
            recipe["description"] = (description.replace("; trained", f", {seen}; trained", 1) if "; trained" in description
                                     else f"{description} {seen[0].upper()}{seen[1:]}.")
        if args.evaluate_only:
            rescore(recipe, device)
        else:
            build(recipe, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
