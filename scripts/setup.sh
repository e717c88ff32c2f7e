#!/usr/bin/env bash
# Set up DiffDenoise on a fresh machine: the CPU build of torch first (a bare `torch`
# requirement would pull several GB of CUDA packages), then the package itself.
#   bash scripts/setup.sh          the command line, the shipped models and the example scans
#   bash scripts/setup.sh --test   also the test dependencies and the
#                                  Slicer libraries (slicer-core wheel, PySide6) the module's tests use
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore

with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # real example scans for the demo and the tests (offline, from Debian)
  packages="mricron-data invesalius-examples"
  # the panel and MRML tests run Qt and VTK offscreen
  [ "$with_tests" = 1 ] && packages="$packages libegl1 libgl1 libxkbcommon0 libfontconfig1 fonts-dejavu-core"
  missing=$(for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi

python -m pip install -q --disable-pip-version-check "torch==2.13.0"
if [ "$with_tests" = 1 ]; then
  python -m pip install -q --disable-pip-version-check -e ".[test]"
  # the real MRML libraries and Qt for the Slicer module's tests (Slicer itself bundles both)
  python -m pip install -q --disable-pip-version-check "slicer-core==5.13.31053.0" "PySide6-Essentials==6.12.0"
else
  python -m pip install -q --disable-pip-version-check -e .
fi
# real DICOM example scans (MIT-licensed data) for the demo and the tests
python -m pip install -q --disable-pip-version-check "pydicom-data>=1.0"
