"""Denoise real scans offline with the shipped default models, through the `diffdenoise` command.

    python scripts/demo.py [--out demo] [--mode fast|full]

- a real head CT volume with its own scanner noise (the InVesalius example, Debian
  invesalius-examples; the shipped CT model was trained on it, with extra noise added),
- a head CT slice and a shoulder MRI slice the models never saw (pydicom-data).

Each result is written as NRRD with a before | after | removed picture (PNG) beside it.
Images whose package is not installed are skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from DiffDenoiseLib import datasets  # noqa: E402
from DiffDenoiseLib.imageio import write_image  # noqa: E402


def examples(out: Path):
    """(name, input path) of every example image available here."""
    found = []
    try:
        ct = out / "head_ct_volume.nrrd"
        if not ct.exists():
            write_image(datasets.invesalius_head_ct(), ct)
        found.append(("head_ct_volume", ct))
    except FileNotFoundError as missing:
        print(f"skipping the head CT volume: {missing}", file=sys.stderr)
    for name, file in (("head_ct_slice", "693_UNCR.dcm"), ("shoulder_mr_slice", "MR2_UNCR.dcm")):
        try:
            found.append((name, datasets.pydicom_path(file)))
        except FileNotFoundError as missing:
            print(f"skipping {file}: {missing}", file=sys.stderr)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo")
    parser.add_argument("--mode", choices=("fast", "full"), default="fast")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for name, source in examples(out):
        arguments = ["denoise", str(source), str(out / f"{name}_denoised.nrrd"), "--mode", args.mode,
                     "--preview", str(out / f"{name}_before_after.png")]
        print("$ diffdenoise " + " ".join(shlex.quote(a) for a in arguments), flush=True)
        # in the caller's folder, so relative paths mean what they say; the package from this checkout
        failures += subprocess.call([sys.executable, "-m", "DiffDenoiseLib"] + arguments, env=environment) != 0
    print(f"results in {out.resolve()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
