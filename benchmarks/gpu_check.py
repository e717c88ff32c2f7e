"""Fast and Full on a CUDA GPU against the CPU of the same machine: the same image, in how many seconds, in how
much GPU memory. Needs a CUDA device; the CPU side uses all its cores.

    python benchmarks/gpu_check.py [--out benchmarks/results]

On the InVesalius head CT (Debian invesalius-examples): slice 54 with white Gaussian noise of 60 HU through
`ct-head-default` (a 2D image), and slices 48-60 with correlated noise (kernel 1.2 px, std 0.1 of the
0.5-99.5 percentile range) through `correlated-noise-2.5d`, its centre slice denoised; each in Fast and Full,
once on each device after a warm-up on the GPU. Then slices 42-66, as they are (the scan's own faint noise, whose
shape the volumetric filter reads) and with white noise of 60 HU, through `ct-head-2.5d` in Fast, the middle 8
denoised by the volumetric filter. Then the whole volume with correlated noise in Fast, and 48 of
its slices in Full, on the GPU, as a user runs them. Writes gpu_check.json and gpu_check.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from DiffDenoiseLib import datasets  # noqa: E402
from DiffDenoiseLib.atomic import replaced_when_done  # noqa: E402
from DiffDenoiseLib.imageio import Image  # noqa: E402
from DiffDenoiseLib.metrics import psnr  # noqa: E402
from DiffDenoiseLib.noise import add_noise  # noqa: E402
from DiffDenoiseLib.normalization import HIGH_PERCENTILE, LOW_PERCENTILE  # noqa: E402
from DiffDenoiseLib.pipeline import denoise_image  # noqa: E402
from DiffDenoiseLib.store import SHIPPED_DIR, load_model  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def timed(run, device: torch.device = CUDA):
    """(result, seconds, peak GPU MiB or None) of one run on `device`, the GPU's work included."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = run()
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return result, seconds, round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if on_gpu else None


def agreement(name, image, where, clean, data_range, devices=(CUDA, CPU), modes=("fast", "full"), noise=None):
    """One model in `modes` on the GPU and the CPU (`devices`, in that order): seconds, PSNR against the
    clean slice, and how far apart the two images are; `noise` names the input's noise in the report."""
    rows = []
    models = [load_model(SHIPPED_DIR / name, device=device) for device in devices]
    for mode in modes:
        row, outputs = {"model": name if noise is None else f"{name} ({noise})", "mode": mode,
                        "shape": list(image.array.shape)}, {}
        for label, device, model in zip(("cuda", "cpu"), devices, models):

            def run():
                return denoise_image(image, model, mode=mode, device=device, **where)

            if label == "cuda":
                run()  # warm-up: kernels, cuDNN's choices
            result, seconds, peak = timed(run, device)
            outputs[label] = np.asarray(result.image.array, np.float64).reshape(clean.shape)
            row[f"{label}_seconds"] = round(seconds, 3)
            if label == "cuda":
                row["cuda_peak_mib"] = peak
            row[f"{label}_psnr"] = round(psnr(clean, outputs[label], data_range), 3)
        difference = np.abs(outputs["cuda"] - outputs["cpu"])
        row.update(max_abs_diff_hu=round(float(difference.max()), 3), mean_abs_diff_hu=round(float(difference.mean()), 4))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device; torch reports none", file=sys.stderr)
        return 2
    ct = datasets.invesalius_head_ct()
    hu = ct.array.astype(np.float64)
    low, high = np.percentile(hu, [LOW_PERCENTILE, HIGH_PERCENTILE])
    unit = (hu - low) / (high - low)
    rng = np.random.default_rng(5)
    slab = (add_noise(unit[48:61], "correlated", 1.2, rng, sigma=0.1) * (high - low) + low).astype(np.float32)
    white = (hu[54] + rng.normal(0, 60, hu[54].shape)).astype(np.float32)
    rows = agreement("ct-head-default", Image(array=white, spacing=ct.spacing[:2], modality="CT"), {}, hu[54],
                     high - low)
    rows += agreement("correlated-noise-2.5d", Image(array=slab, spacing=ct.spacing, modality="CT"),
                      dict(slice_axis=0, slice_range=(6, 7)), hu[54], high - low)
    # the volumetric filter, which makes the one-pixel 2.5D model's image (in Fast and Full) under white noise and
    # under the scan's own faint noise, whose shape it reads: 25 slices, the middle 8 denoised
    for noise, array in (("own noise", hu[42:67]), ("white 60 HU", hu[42:67] + rng.normal(0, 60, hu[42:67].shape))):
        rows += agreement("ct-head-2.5d", Image(array=array.astype(np.float32), spacing=ct.spacing, modality="CT"),
                          dict(slice_axis=0, slice_range=(8, 16)), hu[50:58], high - low, modes=("fast",),
                          noise=noise)

    noisy = add_noise(unit, "correlated", 1.2, np.random.default_rng(6), sigma=0.1) * (high - low) + low
    volume = Image(array=noisy.astype(np.float32), spacing=ct.spacing, modality="CT")
    model = load_model(SHIPPED_DIR / "correlated-noise-2.5d", device=CUDA)
    whole = {}
    for mode, where in (("fast", {}), ("full", dict(slice_axis=0, slice_range=(30, 78)))):
        _, seconds, peak = timed(lambda: denoise_image(volume, model, mode=mode, device=CUDA, **where))
        start, stop = where.get("slice_range", (0, hu.shape[0]))
        whole[mode] = {"slices": stop - start, "seconds": round(seconds, 2),
                       "seconds_per_slice": round(seconds / (stop - start), 3), "cuda_peak_mib": peak}
        print(mode, whole[mode], flush=True)

    results = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0),
               "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "agreement": rows,
               "volume_256x256": whole}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with replaced_when_done(out / "gpu_check.json") as path:
        path.write_text(json.dumps(results, indent=1))
    with replaced_when_done(out / "gpu_check.md") as path:
        path.write_text(report(results))
    return 0


def report(results: dict) -> str:
    lines = [f"# GPU check ({results['gpu']}, torch {results['torch']}, {results['cpu_threads']} CPU threads, "
             f"{results['date']})", "", *([f"Code: {results['code']}.", ""] if "code" in results else []),
             "On the 13-slice input only the centre slice is denoised (its neighbours feed the 2.5D networks and "
             "groups); on the 25-slice inputs the middle 8 (the volumetric filter's; under the scan's own noise the "
             "PSNR is against the scan itself: how much was changed).", "",
             "| model | mode | input | GPU s | CPU s | GPU peak MiB | PSNR GPU | PSNR CPU | GPU - CPU mean / max HU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["agreement"]:
        lines.append(f"| {r['model']} | {r['mode']} | {'x'.join(map(str, r['shape']))} | {r['cuda_seconds']} | "
                     f"{r['cpu_seconds']} | {r['cuda_peak_mib']} | {r['cuda_psnr']} | {r['cpu_psnr']} | "
                     f"{r['mean_abs_diff_hu']} / {r['max_abs_diff_hu']} |")
    lines += ["", "Whole CT volume (108 slices of 256x256) with correlated noise, on the GPU:", ""]
    for mode, w in results["volume_256x256"].items():
        lines.append(f"- {mode}: {w['slices']} slices in {w['seconds']} s ({w['seconds_per_slice']} s per slice), "
                     f"peak {w['cuda_peak_mib']} MiB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
