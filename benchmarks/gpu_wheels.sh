#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels that benchmarks/gpu_suite.py needs on the GPU machine
# (CPython 3.12, manylinux x86-64, no network there) into the git-ignored .whl/ folder of the repository.
#
# The GPU machine already has torch (CUDA), numpy, scipy, pillow, pyyaml, tqdm, tensorboard, einops, safetensors,
# scikit-learn, pandas, joblib, lxml, requests, packaging, psutil, h5py, matplotlib and scikit-image. It lacks:
#   monai    (Requires-Dist: numpy, torch: both there)
#   nibabel  (Requires-Dist: numpy, packaging, typing-extensions below Python 3.13 (torch requires it too, so it is
#             there); importlib-resources only below Python 3.12)
#   nilearn  (Requires-Dist: jinja2 (torch requires it), joblib, nibabel, numpy, packaging, pandas, requests,
#             scikit-learn, scipy: all there once nibabel is)
# so exactly these three wheels, pinned: monai and nibabel as this project's test venv has them, nilearn at its
# current release (the `brain` dataset only reads the MNI152 template that ships inside its wheel).
#
# Idempotent: a wheel already in .whl/ is not fetched again; wheels of other versions of these packages are removed.
# Prints the folder's total size (it travels with the working tree, whose limit is 64 MiB in all).
#
#   bash benchmarks/gpu_wheels.sh            # from the repository root, or from anywhere
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
PYTHON="${PYTHON:-python3}"
WHEELS=(
    "monai==1.6.1"
    "nibabel==5.4.2"
    "nilearn==0.14.1"
)
LIMIT_MIB=60

mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
    name="${spec%%==*}"
    version="${spec##*==}"
    # wheel file names spell the project name in lower case with '_' for '-'
    stem="$(echo "$name" | tr '[:upper:]-' '[:lower:]_')"
    if compgen -G "$DEST/${stem}-${version}-*.whl" > /dev/null; then
        echo "have    $spec"
    else
        echo "fetch   $spec"
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 -d "$DEST" "$spec"
    fi
    for old in "$DEST/${stem}"-*.whl; do
        case "$old" in
            "$DEST/${stem}-${version}-"*) ;;
            *) [ -e "$old" ] && { echo "remove  $(basename "$old") (not $version)"; rm -f "$old"; } ;;
        esac
    done
done

total=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f 1)
ls -l "$DEST"/*.whl | awk '{printf "  %8.1f MiB  %s\n", $5 / 1048576, $NF}'
awk -v b="$total" -v lim="$LIMIT_MIB" 'BEGIN {
    printf "total   %.1f MiB in %s wheel files (limit for this folder: %d MiB)\n", b / 1048576, ARGV[1], lim
    if (b / 1048576 > lim) { print "error: .whl/ is larger than the limit"; exit 1 } }' "${#WHEELS[@]}"
