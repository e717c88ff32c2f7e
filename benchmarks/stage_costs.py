"""Seconds per megapixel of each stage of a denoising run on this machine: the costs DenoiseLogic.estimate counts.

    python benchmarks/stage_costs.py [--out benchmarks/results] [--sides 128 256] [--repeats N]

Each stage runs once, on the CPU, through the library's public functions on synthetic slices of each
side: a smooth phantom under white Gaussian noise, or under that noise blurred in-plane by a Gaussian
of 1.2 pixels for the correlated-noise filters (of 0.5 for the volumetric filter reading the noise's shape, the
mildly correlated noise it is chosen for). The networks are the shipped models' (their weights do
not change the cost). `--stages` measures only the stages named and keeps the others' figures from the JSON
already in the output folder. Writes stage_costs.json (machine, date, torch, the load average before and after,
each stage's seconds per megapixel and per slice at each side) and stage_costs.md. A few minutes on
two cores; on a machine busy with other work the numbers come out high (compare the load averages, or
keep the fastest of a few --repeats).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from DiffDenoiseLib.atomic import replaced_when_done  # noqa: E402
from DiffDenoiseLib.noise import add_noise, noise_variance_curve  # noqa: E402
from DiffDenoiseLib.noise_weight import PROBES, choose_noise_scale, probe_pixels  # noqa: E402
from DiffDenoiseLib.pipeline import (  # noqa: E402
    CORRELATED_FILTER_SLICE_REACH, DenoisingModel, run_network_on_slices, white_noise_pilot_2d,
)
from DiffDenoiseLib.store import SHIPPED_DIR, load_model  # noqa: E402
from DiffDenoiseLib.wiener import (  # noqa: E402
    collaborative_hard_threshold,
    collaborative_wiener,
    noise_shape_steps,
    shape_read_steps,
    slices_read,
    volumetric_filter,
    volumetric_filter_steps,
    wiener_reference_slices,
)

from benchmarks.measure import measured  # noqa: E402
from benchmarks.run_benchmark import machine  # noqa: E402

CPU = torch.device("cpu")
WHITE_NOISE_STD = 25 / 255
CORRELATED_KERNEL = 1.2  # pixels, the benchmark's stronger correlated noise
MILD_KERNEL = 0.5  # pixels, the benchmark's milder one
CONTEXT = 2  # neighbouring slices on each side of the shipped 2.5D models
LONG_VOLUME = 1000  # slices: the volumetric filter's passes per slice of a whole scan
MODELS = {"2d": "ct-head-default", "wide": "correlated-noise-default"}  # 2D, one-pixel and wide blind spot


@dataclass
class Stage:
    """One stage as the estimate counts it: `run(noisy, models)` on {"white", "correlated", "mild": (slices, side,
    side) stack} returns how many slices' worth of output it made, or that and the seconds of the part of its call
    the stage is (timed by the stage itself)."""

    name: str
    what: str
    slices: int  # in the stack it is given
    run: Callable[[Dict[str, np.ndarray], Dict[str, DenoisingModel]], Union[float, Tuple[float, float]]]


def networks(fn: Callable[[np.ndarray], object]) -> Callable:
    """A stage that runs one network evaluation per slice of the white-noise stack."""
    def run(noisy, models):
        run_network_on_slices(fn(models), noisy["white"], 0, CPU)
        return len(noisy["white"])
    return run


def diffusion_evaluation(models):
    """One evaluation of the diffusion UNet, as each DDIM step of SRDS makes for each of a pair's two samples."""
    unet = models["2d"].network("diffusion")
    return lambda stack: unet(stack, torch.full((stack.shape[0],), 100, dtype=torch.long), stack)


def volumetric(noise: str, deep_groups: bool = False, read_shape: bool = False, part: str = "filter"):
    """The volumetric filter on the whole stack under `noise` ("white", or "mild" for it reading the noise's shape), its
    Wiener groups as deep as their similar cubes allow where `deep_groups` (every mode's but Fast's; noise that reads
    correlated keeps its own), reading the shape of white noise too where `read_shape` (strong noise whose binning
    ratio is above 1.3). `part` "filter": its time after reading the shape (where it reads it), in slices of a long
    scan (a short stack has fewer passes per slice); "shape_read": the time of the read alone, which does not grow
    with a long scan's length, per step of it (`wiener.shape_read_steps`), in slices, so that its figure is per
    megapixel of one slice."""
    correlated_noise = noise != "white" or read_shape

    def reads_of(n: int) -> int:
        """The filter's progress steps on n slices that read the shape (they come first)."""
        return shape_read_steps(n, range(n)) if correlated_noise else 0

    def filter_steps(n: int) -> int:
        """Its progress steps on n slices after the read."""
        return volumetric_filter_steps(n, range(n), correlated_noise) - reads_of(n)

    def run(noisy, models):
        y = noisy[noise]
        n = len(y)
        started = time.perf_counter()
        curve = noise_variance_curve(y)  # the filter's part: it grows with the scan
        curve_s = time.perf_counter() - started
        read, whole = seconds_until_step(lambda progress: volumetric_filter(
            y, curve, correlated_noise=correlated_noise, deep_groups=deep_groups, progress=progress), reads_of(n))
        if part == "shape_read":
            return reads_of(n), read
        return filter_steps(n) / (filter_steps(LONG_VOLUME) / LONG_VOLUME), curve_s + whole - read
    return run


def seconds_until_step(call: Callable[[Callable[[], None]], object], step: int) -> Tuple[float, float]:
    """(seconds until `call(progress)` called its progress the `step`-th time, 0 for none; seconds of the whole call):
    a filter's first steps timed apart from the rest of it."""
    times: List[float] = []
    begun = time.perf_counter()
    call(lambda: times.append(time.perf_counter()))
    return (times[step - 1] - begun if step else 0.0), time.perf_counter() - begun


def filters_2d(correlated_noise: bool, deep_groups: bool = False):
    """A 2D model's filters: hard thresholding, then the Wiener step guided by its estimate, its groups under white
    noise as deep as their similar patches allow where `deep_groups` (every mode's but Fast's)."""
    def run(noisy, models):
        y = noisy["correlated" if correlated_noise else "white"]
        curve = noise_variance_curve(y)
        estimate = collaborative_hard_threshold(y, y, curve, correlated_noise=correlated_noise)
        collaborative_wiener(y, estimate, curve, correlated_noise=correlated_noise, deep_groups=deep_groups)
        return len(y)
    return run


def noise_weight_2d(deep_groups: bool):
    """Choosing a 2D image's weight of the noise (noise_weight.py) on each slice, per probe and megapixel of its
    crops; y stands in for the network's result in the pilot (the cost hardly depends on it)."""
    def run(noisy, models):
        y = noisy["white"]
        curve = noise_variance_curve(y)
        for i in range(len(y)):
            choose_noise_scale(y[i:i + 1], curve, lambda crops, louder: white_noise_pilot_2d(crops, crops, louder),
                               deep_groups=deep_groups)
        return len(y) * PROBES * probe_pixels(y.shape[1:]) / (y.shape[1] * y.shape[2])
    return run


def noise_shape_read_2d(noisy, models):
    """A 2D model's first step reading the noise's shape before it (strong noise whose binning ratio is above 1.3):
    the read's time alone, per step of it (`wiener.noise_shape_steps`: it reads COVARIANCE_SLICES slices at most)."""
    y = noisy["white"]
    curve = noise_variance_curve(y)
    reads = noise_shape_steps(range(len(y)))
    read, _ = seconds_until_step(lambda progress: collaborative_hard_threshold(
        y, y, curve, noise_shape=True, progress=progress), reads)
    return reads, read


def wiener_with_context(correlated_noise: bool, context: int):
    """A 2.5D model's Wiener step on the middle slices, each with `context` whole slices on either side (the pilot
    stands in for the networks' result: the cost does not depend on it). Under correlated noise the slices within
    `context` of those are reference slices too (wiener.spreads); the stack (`context_stack`) is long enough that
    each of them has its full `context` on either side, as in a long volume."""
    def run(noisy, models):
        y = noisy["correlated" if correlated_noise else "white"]
        margin = slices_read(context, correlated_noise)
        middle = range(margin, len(y) - margin)
        collaborative_wiener(y, y, noise_variance_curve(y), context=context, indices=middle,
                             correlated_noise=correlated_noise)
        return wiener_reference_slices(len(y), middle, context, correlated_noise)
    return run


def context_stack(correlated_noise: bool, context: int) -> int:
    """The slices `wiener_with_context` is given: two middle slices and all their Wiener step reads either side."""
    return 2 + 2 * slices_read(context, correlated_noise)


NETWORK_STAGES = [
    Stage("student", "one pass of the student (Fast; a second one measures the share of the input kept)", 4,
          networks(lambda models: models["2d"].network("student"))),
    Stage("bsn", "one view of the one-pixel blind-spot estimate (Full takes the model's self-ensemble of views)", 4,
          networks(lambda models: models["2d"].blind_spot_estimate(1))),
    Stage("bsn_wide", "one view of the wide blind spot's estimate (shuffles and refining passes)", 4,
          networks(lambda models: models["wide"].blind_spot_estimate(1))),
    Stage("diffusion", "one diffusion UNet evaluation (SRDS makes 2 x steps x pairs of them)", 4,
          networks(diffusion_evaluation)),
]
FILTER_STAGES = [
    Stage("volumetric_filter", "the volumetric filter on a whole volume (a 2.5D model, white noise; Fast)", 8,
          volumetric("white")),
    Stage("volumetric_filter_deep_groups", "the same with Wiener groups as deep as their similar cubes allow "
          "(Full and the other modes)", 8, volumetric("white", deep_groups=True)),
    Stage("noise_shape_read", "the volumetric filter reading the noise's shape, per step of the read (40 on a volume "
          "of 24 slices or more, a first step on part of a slice each; under noise of a 0.5-pixel kernel)", 8,
          volumetric("mild", part="shape_read")),
    Stage("correlated_volumetric_filter", "the volumetric filter after reading the shape of noise that reads "
          "correlated in it (a 0.5-pixel kernel's; any mode)", 8, volumetric("mild")),
    Stage("shaped_volumetric_filter", "the volumetric filter after reading the shape of noise that reads white in it "
          "(as strong white noise with a binning ratio above 1.3 has it; Fast)", 8,
          volumetric("white", read_shape=True)),
    Stage("shaped_volumetric_filter_deep_groups", "the same with Wiener groups as deep as their similar cubes allow "
          "(Full and the other modes)", 8, volumetric("white", deep_groups=True, read_shape=True)),
    Stage("filters_2d", "hard thresholding + Wiener step of a 2D model's slice (white noise; Fast)", 4,
          filters_2d(False)),
    Stage("filters_2d_deep_groups", "the same with Wiener groups as deep as their similar patches allow (Full and the "
          "other modes)", 4, filters_2d(False, deep_groups=True)),
    Stage("noise_weight_2d", "choosing a 2D image's weight of the noise by recorrupted pairs, per probe (2 an image, "
          "on 4 crops of 128 x 128 at most; Fast)", 2, noise_weight_2d(False)),
    Stage("noise_weight_2d_deep_groups", "the same with Full's deeper Wiener groups (and the other modes')", 2,
          noise_weight_2d(True)),
    Stage("noise_shape_read_2d", "a 2D model's filters reading the noise's shape, per step of the read (4 a slice, "
          "64 from 16 slices on; the filters after it take about their white-noise time)", 4, noise_shape_read_2d),
    Stage("wiener_context", "Wiener step with 2 slices of context (2.5D, white noise, under 4 slices)",
          context_stack(False, CONTEXT), wiener_with_context(False, CONTEXT)),
    Stage("correlated_filters_2d", "both steps with each coefficient's exact variance (2D, correlated noise)", 2,
          filters_2d(True)),
    Stage("correlated_wiener_context", f"Wiener step with exact variances, groups from {CORRELATED_FILTER_SLICE_REACH} "
          "slices either way (2.5D, correlated)", context_stack(True, CORRELATED_FILTER_SLICE_REACH),
          wiener_with_context(True, CORRELATED_FILTER_SLICE_REACH)),
]
STAGES = NETWORK_STAGES + FILTER_STAGES


def phantom(slices: int, side: int) -> np.ndarray:
    """Smooth anatomy-like slices in [0, 1]: an ellipse of tissue with a few blobs, changing slowly along the stack."""
    y, x = np.mgrid[-1:1:side * 1j, -1:1:side * 1j]
    out = []
    for k in range(slices):
        shift = 0.05 * k / max(slices - 1, 1)
        body = ((x / 0.85) ** 2 + (y / 0.7) ** 2 < 1.0) * 0.4
        blobs = sum(0.3 * np.exp(-((x - cx - shift) ** 2 + (y - cy) ** 2) / 0.02)
                    for cx, cy in ((-0.3, 0.1), (0.25, -0.2), (0.1, 0.35)))
        out.append(body + blobs + 0.1 * np.sin(6 * x + k * 0.2) * (body > 0))
    return np.stack(out)


def timed(stage: Stage, noisy: Dict[str, np.ndarray], models: Dict[str, DenoisingModel]) -> Tuple[float, float]:
    """(slices' worth of output, seconds) of one run of `stage`: its whole call's, or the part it timed itself."""
    made, seconds, _ = measured(lambda: stage.run(noisy, models))
    return made if isinstance(made, tuple) else (made, seconds)


def measure(sides: List[int], repeats: int, names: Optional[List[str]] = None) -> Dict[str, dict]:
    """{stage: {what, seconds_per_megapixel {side: s}, seconds_per_slice {side: s}, load_average {side: 1-minute
    load after it}}} of the stages `names` (all by default), each the least of `repeats` runs (other work on the
    machine only ever adds time)."""
    chosen = [stage for stage in STAGES if names is None or stage.name in names]
    models = {key: load_model(SHIPPED_DIR / name) for key, name in MODELS.items()}
    warm = phantom(2, 32).astype(np.float32)
    for stage in NETWORK_STAGES:  # torch's first calls pay for its set-up
        stage.run({"white": warm}, models)
    rng = np.random.default_rng(0)
    today = datetime.date.today().isoformat()
    results = {stage.name: {"what": stage.what, "date": today, "seconds_per_megapixel": {}, "seconds_per_slice": {},
                            "load_average": {}} for stage in chosen}
    for side in sides:
        for stage in chosen:
            clean = phantom(stage.slices, side)
            noisy = {"white": add_noise(clean, "gaussian", WHITE_NOISE_STD, rng).astype(np.float32),
                     **{name: add_noise(clean, "correlated", kernel, rng).astype(np.float32)
                        for name, kernel in (("correlated", CORRELATED_KERNEL), ("mild", MILD_KERNEL))}}
            per_slice = min(seconds / slices for slices, seconds in (timed(stage, noisy, models)
                                                                    for _ in range(repeats)))
            result, load = results[stage.name], os.getloadavg()[0]
            result["seconds_per_slice"][str(side)] = round(per_slice, 4)
            result["seconds_per_megapixel"][str(side)] = round(per_slice / (side * side / 1e6), 3)
            result["load_average"][str(side)] = round(load, 2)
            print(f"{stage.name:>26} {side}x{side}: {per_slice:8.3f} s per slice (load {load:.2f})", flush=True)
    return results


def markdown(results: dict) -> str:
    sides, load, cpu = results["sides"], results["load_average"], results["machine"]
    lines = ["# Stage costs", "",
             f"{results['date']}, {cpu['cpu']} ({cpu['cores']} cores, torch {cpu['torch']}, {cpu['torch_threads']} "
             f"threads); load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after; the least of "
             f"{results['repeats']} run(s) a stage. The run's own threads make a load of about their number: more "
             "means other work shared the cores and the numbers are high. Written by "
             "`python benchmarks/stage_costs.py`; `DiffDenoiseLib/slicer_logic.py` quotes them for the estimate "
             "shown before a run. A stage measured on another date kept that run's figures (`--stages`), taken "
             "on its machine.", "",
             "| stage | what | " + " | ".join(f"s/megapixel at {s}" for s in sides) + " | "
             + " | ".join(f"s per {s}x{s} slice" for s in sides) + " | load after | measured |",
             "|---|---|" + "---:|" * (2 * len(sides)) + "---|---|"]
    for name, stage in results["stages"].items():
        cells = [f"{stage['seconds_per_megapixel'][str(s)]:.2f}" for s in sides]
        cells += [f"{stage['seconds_per_slice'][str(s)]:.3f}" for s in sides]
        cells.append(" / ".join(f"{stage['load_average'][str(s)]:.1f}" for s in sides))
        cells.append(stage["date"])
        lines.append(f"| `{name}` | {stage['what']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def earlier_run(path: Path, parser: argparse.ArgumentParser) -> dict:
    """The earlier run's results whose figures `--stages` keeps for the stages it does not measure."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        parser.error(f"--stages keeps the other stages' figures from an earlier run, and there is no {path}: "
                     "run without --stages first")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        parser.error(f"--stages keeps the other stages' figures from {path}, which cannot be read: {error}")
    if not isinstance(earlier, dict) or not isinstance(earlier.get("stages"), dict) or "date" not in earlier:
        parser.error(f"{path} is not a stage_costs.py result (no date or stages): run without --stages first")
    return earlier


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the results")
    parser.add_argument("--sides", type=int, nargs="+", default=[128, 256], help="slice sides to measure")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each stage, the fastest kept (default 1)")
    parser.add_argument("--stages", nargs="+", choices=[stage.name for stage in STAGES],
                        help="only these stages; the others keep their figures from the earlier stage_costs.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    earlier = earlier_run(out / "stage_costs.json", parser) if args.stages else {}
    if earlier and earlier.get("sides") != args.sides:
        parser.error(f"--stages needs the earlier run's sides ({earlier.get('sides')}) to keep its figures")
    before = os.getloadavg()
    measured_now = measure(args.sides, args.repeats, args.stages)
    kept = {name: {"date": earlier["date"][:10], **stage} for name, stage in earlier.get("stages", {}).items()}
    stages = {stage.name: measured_now.get(stage.name) or kept[stage.name] for stage in STAGES
              if stage.name in measured_now or stage.name in kept}
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "load_average": {"before": before, "after": os.getloadavg()},
               "sides": args.sides, "repeats": args.repeats, "stages": stages}
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("stage_costs.json", json.dumps(results, indent=2) + "\n"),
                       ("stage_costs.md", markdown(results))):
        with replaced_when_done(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    print(f"wrote {out / 'stage_costs.json'} and {out / 'stage_costs.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
