#!/usr/bin/env bash
# One-command set-up on a fresh machine: .venv at the repository root with the registry's torch and
# torchvision (matching builds, resolved together), the project in editable mode with all extras, and
# Debian's Fashion-MNIST files when apt-get is there. Re-running it when everything is in place takes seconds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.venv"
vpy="$venv/bin/python"

[ -x "$vpy" ] || "$py" -m venv "$venv"

stamp="$venv/.setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
   || ! "$vpy" -c "import torch, torchvision, timm, torchdiffeq, hopfield" >/dev/null 2>&1; then
    echo "[setup] installing into $venv (first time: a few minutes, about 6 GB)"
    # torch and torchvision from the registry in one resolve, so their builds match. PIP_FIND_LINKS is
    # emptied so that a local CPU-only torch wheel (which the registry's torchvision cannot import
    # against) is never picked up; warnings about unreachable extra indexes are filtered out.
    pip_install() { PIP_FIND_LINKS="" "$vpy" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
    pip_install --upgrade pip
    pip_install torch torchvision
    pip_install -e ".[train,dev]"
    echo "$want" > "$stamp"
fi

# Real image data for the experiments: Debian's full Fashion-MNIST.
fmnist=/usr/share/datasets/fashion-mnist
if [ ! -d "$fmnist" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian's dataset-fashion-mnist"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
        || echo "[setup] warning: could not install dataset-fashion-mnist; point experiments at a copy with data.root=<folder>" >&2
fi
echo "[setup] ready: $("$vpy" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
