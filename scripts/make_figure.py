"""The README's figure: noisy / BSN / one DDIM sample / SRDS / student / uncertainty on a real slice.

    python scripts/make_figure.py [--model mr-brain-default] [--out Resources/Figures/method.png]

Takes a Colin27 slice (Debian mricron-data) the shipped MR model never saw at this
noise draw, adds Rician noise (sigma 0.04 of the 99.5th percentile), runs each mode of
the same model and writes one PNG with each panel's PSNR/SSIM against the clean slice.
Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DiffDenoiseLib import datasets  # noqa: E402
from DiffDenoiseLib.imageio import Image  # noqa: E402
from DiffDenoiseLib.metrics import psnr, ssim  # noqa: E402
from DiffDenoiseLib.noise import add_noise  # noqa: E402
from DiffDenoiseLib.pipeline import denoise_image  # noqa: E402
from DiffDenoiseLib.store import ModelStore, load_model  # noqa: E402

PANELS = (("bsn", "blind-spot network"), ("single", "one DDIM sample"), ("full", "SRDS (Full)"),
          ("fast", "student (Fast)"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mr-brain-default")
    parser.add_argument("--slice", type=int, default=100, help="axial slice of Colin27 (numpy axis 0)")
    parser.add_argument("--sigma", type=float, default=0.04)
    parser.add_argument("--out", default=str(ROOT / "Resources" / "Figures" / "method.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volume = datasets.colin27()
    top = float(np.percentile(volume.array, 99.5))
    clean = volume.array[args.slice].astype(np.float64)
    noisy = add_noise(clean / top, "rician", args.sigma, np.random.default_rng(2026)) * top
    image = Image(array=noisy.astype(np.float32), spacing=volume.spacing[:2], origin=volume.origin[:2],
                  direction=(1.0, 0.0, 0.0, 1.0), modality="MR")
    model = load_model(ModelStore().resolve(args.model))
    data_range = float(clean.max() - clean.min())

    shown = [("noisy input", noisy)]
    uncertainty = None
    for mode, title in PANELS:
        result = denoise_image(image, model, mode=mode, seed=0)
        shown.append((title, result.image.array))
        if mode == "full":
            uncertainty = result.uncertainty.array
    figure, axes = plt.subplots(2, 3, figsize=(10.5, 8.2))
    for axis, (title, array) in zip(axes.flat, shown):
        score = f"{psnr(clean, array, data_range=data_range):.2f} dB, SSIM {ssim(clean, array, data_range=data_range):.3f}"
        axis.imshow(np.flipud(array), cmap="gray", vmin=0, vmax=top)
        axis.set_title(f"{title}\n{score}", fontsize=10)
    axes.flat[-1].imshow(np.flipud(uncertainty), cmap="magma")
    axes.flat[-1].set_title("SRDS uncertainty\n(half the pair difference)", fontsize=10)
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle(f"Colin27 T1 slice {args.slice}, Rician noise sigma {args.sigma} -- model '{args.model}'",
                    fontsize=11)
    figure.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
