#!/usr/bin/env bash
# Wheels for a GPU machine without registry access (bench/gpu.py's device run), into .wheels/ (git-ignored).
#   scripts/gpu_wheels.sh download   here, with network: the packages the device lacks, at the versions of this venv,
#                                    for Python 3.12 (antlr4-python3-runtime 4.9.3, which omegaconf 2.3 pins, is an
#                                    sdist on PyPI: it is built into a pure-Python wheel here)
#   scripts/gpu_wheels.sh install    on the device: installs each wheel whose package is not there yet (--no-deps,
#                                    so the device's own torch, numpy, pandas, ... stay as they are), then this repo
set -euo pipefail
cd "$(dirname "$0")/.."
# What the device lacks (bench/gpu.py's docstring) plus the small pure-Python or binary imports `datasets` needs.
PACKAGES=(hydra-core omegaconf antlr4-python3-runtime datasets dill multiprocess xxhash fsspec)

case "${1:-}" in
download)
    mapfile -t pins < <(python -c 'import importlib.metadata as m, sys
for name in sys.argv[1:]: print(f"{name}=={m.version(name)}")' "${PACKAGES[@]}")
    rm -rf .wheels && mkdir .wheels
    binary=() sdist=()
    for pin in "${pins[@]}"; do
        if [[ $pin == antlr4-python3-runtime==4.9.* ]]; then sdist+=("$pin"); else binary+=("$pin"); fi
    done
    pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d .wheels "${binary[@]}"
    if [ "${#sdist[@]}" -gt 0 ]; then pip wheel -q --no-deps -w .wheels "${sdist[@]}"; fi
    ls .wheels
    ;;
install)
    for wheel in .wheels/*.whl; do
        name=$(basename "$wheel" | cut -d- -f1)
        if ! pip show -q "$name" >/dev/null 2>&1; then pip install -q --no-index --no-deps "$wheel"; fi
    done
    pip install -q --no-build-isolation --no-deps -e .
    ;;
*)
    echo "usage: $0 download|install" >&2
    exit 2
    ;;
esac
