#!/usr/bin/env bash
# The IO, export, MRML and batch tests against the Python packages each supported Slicer bundles.
#   bash Testing/slicer_versions/run.sh [VERSION ...]     (default: every version in pins.txt)
# One virtual environment per version under ${DOSEAI_CACHE:-~/.cache/doseai}/slicer-versions, with that Slicer's
# pydicom, numpy and SimpleITK (Slicer's SuperBuild/External_python-*.cmake at the release tag, see pins.txt) and
# torch 2.13.0 (the build the shipped weights were made with). Python is this machine's python3: Slicer 5.10 and
# 5.12 bundle Python 3.12.10; the torch build this workplace installs is for the machine's Python.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${DOSEAI_CACHE:-$HOME/.cache/doseai}/slicer-versions"
versions=("$@")
[ ${#versions[@]} -gt 0 ] || mapfile -t versions < <(grep -v '^#' "$here/pins.txt" | awk 'NF {print $1}')
# what the bundled packages touch: reading and writing images and DICOM, MRML nodes, the batch script
tests=(Testing/test_dicom.py Testing/test_images.py Testing/test_openkbp.py Testing/test_case.py
       Testing/test_batch_predict.py Testing/test_packages.py Testing/mrml)
for extra in Testing/test_fuzz_readers.py Testing/test_dicom_conformance.py; do
  [ -f "$repo/$extra" ] && tests+=("$extra")
done
for version in "${versions[@]}"; do
  pins=$(awk -v v="$version" '$1 == v {$1 = ""; print}' "$here/pins.txt")
  [ -n "$pins" ] || { echo "slicer-versions: no pins for Slicer $version in $here/pins.txt" >&2; exit 2; }
  venv="$cache/$version"
  echo "== Slicer $version: $pins (Python $(python3 -c 'import platform; print(platform.python_version())'))"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # (pipefail keeps pip's exit status; the filter drops the lines this workplace's pip config adds)
  "$venv/bin/pip" install -q torch==2.13.0 -e "$repo[models,test]" $pins 2>&1 | { grep -v "^WARNING: Location" || true; }
  "$venv/bin/python" - "$pins" <<'PY'
import importlib.metadata, sys
for pin in sys.argv[1].split():
    name, version = pin.split("==")
    installed = importlib.metadata.version(name)
    assert installed == version, f"{name} {installed} installed, {version} pinned"
print("pins installed:", sys.argv[1])
PY
  (cd "$repo" && "$venv/bin/python" -m pytest "${tests[@]}" -q -p no:cacheprovider)
done
