"""The benchmark's report: markdown tables, the goals checked against the numbers, and crop figures."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from DiffDenoiseLib.metrics import psnr
from DiffDenoiseLib.wiener import CUBE_SLICE_REACH

from benchmarks.ours import MODES as OURS
METRICS = ("psnr", "ssim", "psnr_fg", "ssim_fg", "edge_correlation", "seconds", "peak_mib")


def aggregate(rows: Sequence[dict]) -> "OrderedDict[Tuple[str, str], Dict[str, dict]]":
    """Mean of every metric over the test slices: {(image, noise): {method: {metric: value}}}."""
    groups: "OrderedDict[Tuple[str, str], Dict[str, List[dict]]]" = OrderedDict()
    for row in rows:
        groups.setdefault((row["image"], row["noise"]), {}).setdefault(row["method"], []).append(row)
    table: "OrderedDict[Tuple[str, str], Dict[str, dict]]" = OrderedDict()
    for key, methods in groups.items():
        table[key] = {}
        for method, items in methods.items():
            means = {}
            for metric in METRICS:
                values = [r[metric] for r in items if r.get(metric) is not None]
                means[metric] = float(np.mean(values)) if values else None
            # the CT flat-tissue bias: the mean over the antithetic pairs of every test slice, and its standard error
            pairs = [v for r in items for v in r.get("flat_bias_pairs") or []]
            means["flat_bias"] = float(np.mean(pairs)) if pairs else None
            means["flat_bias_se"] = float(np.std(pairs, ddof=1) / np.sqrt(len(pairs))) if len(pairs) > 1 else None
            means["unit"] = items[0]["unit"]
            means["filters_made_the_image"] = next((r["filters_made_the_image"] for r in items
                                                    if r.get("filters_made_the_image")), None)
            table[key][method] = means
        table[key] = dict(table[key])
    return table


def methods_of(table) -> List[str]:
    seen: List[str] = []
    for methods in table.values():
        seen += [m for m in methods if m not in seen]
    return seen


def peers_of(methods: Sequence[str]) -> List[str]:
    return [m for m in methods if m not in OURS + ("noisy", "oracle")]


def best_peer(methods: Dict[str, dict], peers: Sequence[str], metric: str = "psnr") -> Optional[str]:
    present = [p for p in peers if p in methods and methods[p][metric] is not None]
    return max(present, key=lambda p: methods[p][metric]) if present else None


def quality_table(table, methods: Sequence[str], psnr_key: str, ssim_key: str) -> List[str]:
    """Rows image x noise, a PSNR / SSIM cell per method; the best non-oracle PSNR of a row in bold."""
    lines = ["| image | noise | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for (image, noise), row in table.items():
        contenders = [m for m in methods if m in row and m not in ("noisy", "oracle")]
        top = max(contenders, key=lambda m: row[m][psnr_key]) if contenders else None
        cells = []
        for m in methods:
            if m not in row:
                cells.append("n/a")
                continue
            cell = f"{row[m][psnr_key]:.2f} / {row[m][ssim_key]:.3f}"
            cells.append(f"**{cell}**" if m == top else cell)
        lines.append(f"| {image} | {noise} | " + " | ".join(cells) + " |")
    return lines


def cost_table(table, methods: Sequence[str]) -> List[str]:
    lines = ["| method | seconds / slice | peak extra memory (MiB) | method-noise edge correlation | "
             "CT flat-region bias, mean abs (HU) |", "|---|---|---|---|---|"]
    for m in methods:
        rows = [r[m] for r in table.values() if m in r]
        mean = lambda key: np.mean([r[key] for r in rows if r[key] is not None]) if rows else float("nan")  # noqa
        ct = [abs(r["flat_bias"]) for r in rows if r["unit"] == "HU" and r["flat_bias"] is not None]
        lines.append(f"| {m} | {mean('seconds'):.2f} | {mean('peak_mib'):.0f} | {mean('edge_correlation'):.3f} | "
                     + (f"{np.mean(ct):.2f}" if ct else "n/a") + " |")
    return lines


def bias_table(table, pairs: int) -> List[str]:
    """The CT flat-tissue bias per condition and method measured, with its standard error."""
    rows = [(key, row) for key, row in table.items() if any(r["flat_bias"] is not None for r in row.values())]
    if not rows:
        return []
    methods = [m for m in methods_of(table) if any(r.get(m, {}).get("flat_bias") is not None for _, r in rows)]
    lines = ["## CT flat-tissue bias (HU)", "",
             f"Mean shift of the flat tissue (output minus clean) over {pairs} antithetic pair{'s' * (pairs > 1)} of "
             "noise draws per test slice: a draw and the same draw with its sign flipped (2 clean - noisy). One "
             "draw's shift carries that draw's own patch mean, several HU at these noise levels; the pair's mean "
             "cancels what is odd in the noise, so the input itself reads 0 and what remains is the method's own "
             "bias, +- the standard error over the pairs. The reference itself is a real scan with noise of its "
             "own, which a method may remove: how much that moves the patch mean is given per image below "
             "(Images); a method that pools neighbouring slices (BM4D, a 2.5D model's volumetric filter) is "
             "measured against one slice whose patch differs from its neighbours' (measured per image under "
             "Images).", "",
             "| image | noise | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for (image, noise), row in rows:
        cells = []
        for m in methods:
            bias, se = row.get(m, {}).get("flat_bias"), row.get(m, {}).get("flat_bias_se")
            cells.append("n/a" if bias is None else f"{bias:+.2f}" + (f" +- {se:.2f}" if se is not None else ""))
        lines.append(f"| {image} | {noise} | " + " | ".join(cells) + " |")
    return lines + [""]


def check(name: str, margins: List[Tuple[str, float]], threshold: float, what: str) -> List[str]:
    """One goal: met where every margin >= threshold; lists the conditions that miss it."""
    if not margins:
        return [f"- **{name}**: not measured ({what})."]
    misses = [(k, v) for k, v in margins if v < threshold]
    worst = min(margins, key=lambda kv: kv[1])
    status = "met" if not misses else "missed"
    return [f"- **{name}**: {status}: holds on {len(margins) - len(misses)} of {len(margins)} conditions ({what}); "
            f"worst {worst[1]:+.2f} at {worst[0]}."]


def gap_table(table) -> List[str]:
    """Full (SRDS) minus the best peer, PSNR dB: rows noise, columns image; where the method wins or loses."""
    peers = peers_of(methods_of(table))
    images = list(OrderedDict.fromkeys(image for image, _ in table))
    noises = list(OrderedDict.fromkeys(noise for _, noise in table))
    lines = ["| noise | " + " | ".join(images) + " |", "|---|" + "---|" * len(images)]
    for noise in noises:
        cells = []
        for image in images:
            row = table.get((image, noise))
            peer = best_peer(row, peers) if row and "full" in row else None
            cells.append(f"{row['full']['psnr'] - row[peer]['psnr']:+.2f} ({peer})" if peer else "n/a")
        lines.append(f"| {noise} | " + " | ".join(cells) + " |")
    return lines


def goals(table) -> List[str]:
    peers = peers_of(methods_of(table))
    g1, g2a, g2b, g3a, g3b, g4a, g4b = [], [], [], [], [], [], []
    for (image, noise), row in table.items():
        key = f"{image} / {noise}"
        if "full" not in row:
            continue
        full = row["full"]["psnr"]
        peer = best_peer(row, peers)
        if peer:
            g1.append((f"{key} (vs {peer})", full - row[peer]["psnr"]))
        if "fast" in row:
            g2a.append((key, row["fast"]["psnr"] - full))
            if "oracle" in row:
                g2b.append((key, row["fast"]["psnr"] - row["oracle"]["psnr"]))
        if "full-unfused" in row and "single-unfused" in row:
            g3a.append((key, row["full-unfused"]["psnr"] - row["single-unfused"]["psnr"]))
        if "single" in row:
            g3b.append((key, full - row["single"]["psnr"]))
        if "bm3d" in row:
            g4a.append((key, abs(row["bm3d"]["edge_correlation"]) - abs(row["full"]["edge_correlation"])))
        if row["full"]["unit"] == "HU" and row["full"]["flat_bias"] is not None:
            g4b.append((key, 1.0 - abs(row["full"]["flat_bias"])))
    lines = ["## Goals", "",
             "Each goal is checked on every image x noise condition; a margin >= 0 meets it."]
    lines += check("Full (SRDS) >= best peer + 0.5 dB PSNR", [(k, v - 0.5) for k, v in g1], 0.0,
                   "margin = Full - best peer - 0.5 dB")
    lines += check("Fast (student) within 0.3 dB of Full", [(k, v + 0.3) for k, v in g2a], 0.0,
                   "margin = Fast - Full + 0.3 dB")
    lines += check("Fast (student) within 0.5 dB of the supervised oracle", [(k, v + 0.5) for k, v in g2b], 0.0,
                   "margin = Fast - oracle + 0.5 dB")
    below = [k for k, v in g2b if v > 0]
    if below:
        lines.append(f"  The oracle falls below Fast on {len(below)} of {len(g2b)} conditions: at this training "
                     "budget its supervised steps did not improve on the student there, so it bounds nothing and the "
                     "goal's count flatters us.")
    # The pair's gain is the samplers' (what the goal compares); after fusion and the filters both images are
    # mostly the filters' own, which is said below where they made it alone.
    lines += check("SRDS >= one sample + 1.5 dB, the samplers", [(k, v - 1.5) for k, v in g3a], 0.0,
                   "margin = full-unfused - single-unfused - 1.5 dB: the two samplers, before fusion and filters")
    lines += check("SRDS >= one sample + 1.5 dB, the images", [(k, v - 1.5) for k, v in g3b], 0.0,
                   "margin = Full - single - 1.5 dB, both after fusion and the filters")
    for made_by, what in (("volumetric filter", "the volumetric filter made the image of every fused mode and "
                           "of the oracle (their networks did not run): there Fast equals the oracle, Full differs "
                           "from Fast by its deeper Wiener groups only, and SRDS's image equals one sample's"),
                          ("correlated-noise filters", "the correlated-noise filters made the image of every fused "
                           "mode and of the oracle from the noisy image, the networks' result only choosing where the "
                           "noise was read: there Fast and Full are near or equal, and SRDS adds nothing to the "
                           "image")):
        by_filter = [f"{image} / {noise}" for (image, noise), row in table.items()
                     if row.get("full", {}).get("filters_made_the_image") == made_by]
        if by_filter:
            lines.append(f"  On {len(by_filter)} condition{'s' * (len(by_filter) > 1)} ({', '.join(by_filter)}) "
                         f"{what}, so there the counts of the Fast goals and of SRDS's images say nothing about "
                         "the networks.")
    networks = {f"{image} / {noise}" for (image, noise), row in table.items()
                if "full" in row and not row["full"].get("filters_made_the_image")}
    if networks and len(networks) < len(g2a):
        counts = [f"{what} on {sum(v >= limit for k, v in margins if k in networks)} of "
                  f"{sum(k in networks for k, _ in margins)}"
                  for what, margins, limit in (("Fast within 0.3 dB of Full", g2a, -0.3),
                                               ("Fast within 0.5 dB of the oracle", g2b, -0.5),
                                               ("SRDS's image >= one sample's + 1.5 dB", g3b, 1.5))]
        lines.append("  Counted only where the networks' result made or guided the image: " + "; ".join(counts) + ".")
    lines += check("Method noise no more structured than BM3D's", g4a, 0.0,
                   "margin = |BM3D's edge correlation| - |Full's|")
    lines += check("Flat-region CT bias below 1 HU", g4b, 0.0, "margin = 1 HU - |Full's flat-tissue bias|, the mean "
                   "over antithetic pairs of noise draws; see the bias table")
    return lines


def model_summary(model) -> dict:
    card = model.card
    training = card.get("training", {})
    return {"name": card.get("name"), "created": card.get("created"), "stages": card.get("stages"),
            "transform": card.get("transform"), "architecture": card.get("architecture"),
            "sampling": card.get("sampling"), "steps": {s: v.get("steps") for s, v in training.get("stages", {}).items()},
            "training_noise": card.get("training_data", {}).get("noise")}


def markdown(results: dict) -> str:
    table = aggregate(results["rows"])
    methods = methods_of(table)
    m = results["machine"]
    lines = [f"# DiffDenoise benchmark ({results['mode']} mode)", "",
             f"{results['date']} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads"
             f"{', GPU ' + m['gpu'] if m.get('gpu') else ', no GPU'}), Python {m['python']}, torch {m['torch']}; "
             f"{results['wall_seconds'] / 60:.1f} minutes in all. Written by `python benchmarks/run_benchmark.py "
             f"--{results['mode']}`.", "",
             "Intensities are mapped to [0, 1] per image (0.5 / 99.5 percentiles, clipped); noise is added on that "
             "scale and PSNR uses a peak of 1. Cells: PSNR (dB) / SSIM, mean over the test slices; bold: the best "
             "method of a row other than the oracle. `oracle`: Fast mode's student trained "
             f"{results['settings']['oracle_steps']} steps further, supervised, on clean training regions of the "
             "image with the row's noise (benchmarks/oracle.py).", "", "## Models", ""]
    for name, s in results["models"].items():
        lines.append(f"- `{name}`: stages {', '.join(s['stages'] or [])}, transform {s['transform']['name']}, "
                     f"training steps {s['steps']}, trained on {s['training_noise']}, sampling {s['sampling']}.")
    lines += ["", "## Whole image", ""] + quality_table(table, methods, "psnr", "ssim")
    lines += ["", "## Inside the foreground mask", ""] + quality_table(table, methods, "psnr_fg", "ssim_fg")
    lines += ["", "## Full (SRDS) minus the best peer (PSNR dB, whole image)", ""] + gap_table(table)
    lines += ["", "## Cost and fidelity (mean over all conditions)", "",
              "Peak extra memory: resident set size above the level before the call (includes torch's tensors). "
              "Edge correlation: of |noisy - output| / the noise's std at the clean intensity with the clean "
              "image's gradient magnitude (0: only noise removed; without the division, removing exactly "
              "signal-dependent noise would correlate with the edges of bright tissue)."]
    lines += [""] + cost_table(table, methods) + [""]
    lines += bias_table(table, results["settings"].get("bias_pairs", 1)) + goals(table)
    lines += ["", "## Not run", ""]
    lines += [f"- {k}: {v}" for k, v in results["not_run"].items()] or ["- nothing"]
    lines += [f"- image {v}" for v in results["missing_images"]]
    lines += ["", "## Images", ""]
    lines += [f"- `{i['name']}` ({i['modality']}, {i['unit']}): {i['source']}; test crops {i['test_shape']}"
              + (f", BM4D slab depth {i['slab_depth']}" if i['slab_depth'] else "")
              + (f"; the reference's own noise (blind noise curve): std {i['own_noise_std']:.4f} on the 0-1 scale "
                 f"({(i['own_noise_std'] * 255 / 6) ** 2:.2f} times the variance of Gaussian 6/255)"
                 if i.get("own_noise_std") is not None else "") + own_noise_over_flat_patch(i)
              for i in results["images"]]
    return "\n".join(lines) + "\n"


def own_noise_over_flat_patch(image: dict) -> str:
    """What a CT reference's own noise leaves in the mean of its flat patch, if white: the floor under which a
    flat-tissue bias against that reference cannot be told from the reference's own noise."""
    pixels = [n for n in image.get("flat_pixels") or [] if n]
    if image["unit"] != "HU" or not pixels or image.get("own_noise_std") is None:
        return ""
    std_hu = image["own_noise_std"] * (image["unit_range"][1] - image["unit_range"][0])
    offsets = [o for o in image.get("neighbour_offsets") or [] if o is not None]
    pooled = (f"; the same patch in the {CUBE_SLICE_REACH} slices either side, which BM4D's and the volumetric "
              f"filter's groups reach, averages {np.mean(offsets):+.2f} HU from the test slice's: a method that pools "
              "them reads about that much as bias" if offsets else "")
    return (f"; flat-tissue patch of {np.mean(pixels):.0f} voxels per test slice, over which the reference's own "
            f"noise ({std_hu:.1f} HU per voxel) averages to about {std_hu / np.sqrt(sum(pixels)):.2f} HU if white, "
            f"more where it is correlated{pooled}")


def figure_panels(image: str, noise: str, clean: np.ndarray, noisy: np.ndarray,
                  outputs: Dict[str, tuple], peers: Sequence[str], made_by: Optional[str] = None) -> dict:
    """The crops one figure shows: clean / noisy / best peer / SRDS / student / method noise / uncertainty; when
    filters alone made Full's and Fast's image (`made_by` names them) their panels say so, one panel for the two where
    their images are the same."""
    ranked = [p for p in peers if p in outputs]
    top = max(ranked, key=lambda p: psnr(clean, outputs[p][0], data_range=1.0)) if ranked else None
    panels = [("clean", clean), ("noisy", noisy)]
    if top:
        panels.append((f"best peer: {top}", outputs[top][0]))
    ours = (("full", "SRDS (full)"), ("fast", "student (fast)"))
    if made_by:
        same = "fast" in outputs and "full" in outputs and np.array_equal(outputs["fast"][0], outputs["full"][0])
        ours = (("full", f"{made_by} (full, fast)"),) if same else (("full", f"{made_by} (full)"),
                                                                     ("fast", f"{made_by} (fast)"))
    for method, title in ours:
        if method in outputs:
            panels.append((title, outputs[method][0]))
    if "full" in outputs:
        panels.append((f"method noise (noisy - {'full' if made_by else 'SRDS'})", noisy - outputs["full"][0]))
        if outputs["full"][1] is not None:
            panels.append(("uncertainty (SRDS)", outputs["full"][1]))
    scored = {title: psnr(clean, a, data_range=1.0) for title, a in panels[1:5]}
    return {"image": image, "noise": noise, "panels": panels, "psnr": scored}


def write_figures(figures: Sequence[dict], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for fig_spec in figures:
        panels = fig_spec["panels"]
        fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.8))
        for ax, (title, array) in zip(np.atleast_1d(axes), panels):
            if title.startswith("method noise"):
                limit = float(np.percentile(np.abs(array), 99)) or 1.0
                ax.imshow(array, cmap="gray", vmin=-limit, vmax=limit)
            elif title.startswith("uncertainty"):
                ax.imshow(array, cmap="magma", vmin=0.0)
            else:
                ax.imshow(np.clip(array, 0, 1), cmap="gray", vmin=0.0, vmax=1.0)
            score = fig_spec["psnr"].get(title)
            ax.set_title(title + (f"\n{score:.2f} dB" if score is not None else "\n"), fontsize=8)
            ax.axis("off")
        fig.suptitle(f"{fig_spec['image']}, {fig_spec['noise']}", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.92))
        stem = f"{fig_spec['image']}_{fig_spec['noise']}".replace("/", "-").replace(" ", "_")
        fig.savefig(folder / f"{stem}.png", dpi=72)
        plt.close(fig)
