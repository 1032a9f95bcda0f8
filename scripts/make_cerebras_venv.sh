#!/usr/bin/env bash
# Make the Cerebras venv: Python 3.11, cerebras-pytorch==2.10.0 (which pins torch==2.4.0) and this
# package installed editable with its `cerebras` and `dev` extras.
#
#   bash scripts/make_cerebras_venv.sh VENV_DIR
#
# The venv (about 3 GB to download, 6 GB installed, a few minutes) is built once per set of
# dependencies in a cache directory, keyed by a hash of pyproject.toml's dependency lists:
#   ${MODELZOO_VENV_CACHE:-~/.cache/sparse-modelzoo}/venv-cerebras-<hash>
# VENV_DIR becomes a symlink to it, so CI and other checkouts reuse it; every call re-points the
# editable install at this checkout (seconds). MODELZOO_VENV_CACHE=none builds in VENV_DIR itself
# (for a docker image). PYTHON311 names the interpreter (default: python3.11).
set -euo pipefail

if [ "$#" -ne 1 ]; then
    echo "usage: bash scripts/make_cerebras_venv.sh VENV_DIR" >&2
    exit 2
fi
venv_dir=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON311:-python3.11}

if ! version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "make_cerebras_venv: '$python' not found; cerebras-pytorch ships Python 3.11 wheels only:" \
        "install Python 3.11 (apt install python3.11-venv, or pyenv install 3.11) or set PYTHON311=/path/to/python3.11" >&2
    exit 1
fi
if [ "$version" != "3.11" ]; then
    echo "make_cerebras_venv: '$python' is Python $version, but cerebras-pytorch ships Python 3.11 wheels only:" \
        "set PYTHON311=/path/to/python3.11" >&2
    exit 1
fi

# The cache key covers what decides the installed packages: requires-python and the dependency lists.
key=$("$python" - "$repo/pyproject.toml" <<'EOF'
import hashlib, json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
keys = ("requires-python", "dependencies", "optional-dependencies")
blob = json.dumps({k: project.get(k) for k in keys}, sort_keys=True).encode()
print(hashlib.sha256(blob).hexdigest()[:16])
EOF
)

cache_root=${MODELZOO_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sparse-modelzoo}
if [ "$cache_root" = none ]; then
    target=$venv_dir
    # A half-built venv of this script is removed and rebuilt below; anything else in the way is not ours to delete.
    if [ -e "$venv_dir" ] && [ ! -f "$venv_dir/.make_cerebras_venv" ]; then
        echo "make_cerebras_venv: $venv_dir exists and was not made by this script: remove it or pick another VENV_DIR" >&2
        exit 1
    fi
else
    target=$cache_root/venv-cerebras-$key
    if [ -e "$venv_dir" ] && [ ! -L "$venv_dir" ]; then
        echo "make_cerebras_venv: $venv_dir exists and is not a link to the cache: remove it or pick another VENV_DIR" >&2
        exit 1
    fi
    mkdir -p "$cache_root"
fi

build() {
    # A venv is not relocatable, so it is built in place; `.complete` marks a finished build.
    if [ -f "$target/.complete" ]; then
        echo "make_cerebras_venv: reusing $target"
        "$target/bin/python" -m pip install -q --no-deps -e "$repo"
        return
    fi
    rm -rf "$target"
    echo "make_cerebras_venv: building $target (cerebras-pytorch==2.10.0, torch==2.4.0; about 3 GB to download)"
    mkdir -p "$target"
    touch "$target/.make_cerebras_venv"  # marks the directory as this script's, finished or not
    "$python" -m venv "$target"
    "$target/bin/python" -m pip install -q --upgrade pip
    "$target/bin/python" -m pip install -q -e "${repo}[cerebras,dev]"
    "$target/bin/python" -c 'import cerebras.pytorch, torch; print("cerebras.pytorch", cerebras.pytorch.__version__, "torch", torch.__version__)'
    touch "$target/.complete"
}

if [ "$target" = "$venv_dir" ]; then
    build
else
    # One build at a time per cache entry; a second caller waits and then reuses it.
    exec 9>"$target.lock"
    flock 9
    build
    flock -u 9
    ln -sfn "$target" "$venv_dir"
fi
echo "make_cerebras_venv: ready: . $venv_dir/bin/activate"
