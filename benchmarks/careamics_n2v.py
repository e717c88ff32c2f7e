"""Noise2Void (CAREamics) on one noisy test slice; runs inside a separate Python environment.

    <python with careamics> benchmarks/careamics_n2v.py INPUT.npz OUTPUT.npy --steps N [--seed S]

CAREamics needs torchvision built against its own torch, which this project's CPU torch
is not, so the benchmark runs this script with another interpreter (`--n2v-python`).
It imports numpy, careamics and the standard-library-only DiffDenoiseLib.atomic.
INPUT.npz holds `test` (the noisy slice) and `train_*` (noisy training regions of the
same image and noise). N2V is self-supervised,
so it trains on the noisy test slice itself and on those regions, as a user would
train it on the images to denoise, then predicts the test slice. OUTPUT.npy is
written only when complete.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from DiffDenoiseLib.atomic import replaced_when_done  # noqa: E402  (standard library only)

PATCH = 64
BATCH = 16
BATCHES_PER_EPOCH = 16  # CAREamics trains in epochs over one set of crops: this many batches of them


def training_patches(images, count: int, rng: np.random.Generator, patch: int = PATCH) -> np.ndarray:
    """`count` random patch x patch crops, drawn from the images in proportion to their area."""
    usable = [np.asarray(a, np.float32) for a in images if min(np.shape(a)) >= patch]
    if not usable:
        raise ValueError(f"Noise2Void needs an image of at least {patch}x{patch} pixels")
    areas = np.array([a.size for a in usable], dtype=np.float64)
    which = rng.choice(len(usable), size=count, p=areas / areas.sum())
    crops = []
    for i in which:
        a = usable[i]
        y = rng.integers(0, a.shape[0] - patch + 1)
        x = rng.integers(0, a.shape[1] - patch + 1)
        crops.append(a[y:y + patch, x:x + patch])
    return np.stack(crops)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--steps", type=int, required=True,
                        help=f"training batches of {BATCH} patches of {PATCH}x{PATCH}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from careamics import CAREamist
    from careamics.config import create_n2v_config

    with np.load(args.input, allow_pickle=False) as data:
        test = np.asarray(data["test"], np.float32)
        regions = [np.asarray(data[k], np.float32) for k in data.files if k.startswith("train_")]
    rng = np.random.default_rng(args.seed)
    patches = training_patches([test] + regions, BATCHES_PER_EPOCH * BATCH, rng)
    epochs = max(1, int(np.ceil(args.steps / BATCHES_PER_EPOCH)))
    config = create_n2v_config(experiment_name="benchmark", data_type="array", axes="SYX", patch_size=[PATCH, PATCH],
                               batch_size=BATCH, num_epochs=epochs, n_val_patches=BATCH)
    with tempfile.TemporaryDirectory(prefix="n2v-") as work:
        careamist = CAREamist(config, work_dir=work, enable_progress_bar=False)
        careamist.train(train_data=patches)
        predicted, _ = careamist.predict(test, axes="YX", data_type="array")
    out = np.squeeze(np.asarray(predicted[0], np.float64))
    if out.shape != test.shape or not np.all(np.isfinite(out)):
        raise RuntimeError(f"Noise2Void returned {out.shape} with non-finite values for a {test.shape} slice")
    with replaced_when_done(args.output) as tmp:
        np.save(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
