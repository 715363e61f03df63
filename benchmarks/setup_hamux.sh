#!/usr/bin/env bash
# Separate virtual environment for the JAX side of the CPU benchmark: .venv-hamux at the repository root with
# jax, jaxlib, hamux, fastcore (hamux imports fastcore without declaring it) and diffrax. The benchmark runs in
# the project's .venv and imports these from here (both hold numpy 2), so both libraries share one process.
# Idempotent: when hamux and jax already import, nothing is installed and it returns in about a second.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.venv-hamux"
vpy="$venv/bin/python"

[ -x "$vpy" ] || "$py" -m venv "$venv"

if ! "$vpy" -c "import hamux, jax, diffrax" >/dev/null 2>&1; then
    echo "[setup_hamux] installing jax, jaxlib, hamux, fastcore, numpy into $venv"
    # PIP_FIND_LINKS is emptied so only the registry's wheels are used. Pip's "Location ... is ignored"
    # warnings are filtered out; with pipefail on, the filter never fails the pipeline (it always
    # exits 0) while a failing pip still does.
    quiet_pip() { PIP_FIND_LINKS="" "$vpy" -m pip "$@" 2>&1 | { grep -v "is ignored" || true; }; }
    quiet_pip install --quiet --upgrade pip
    quiet_pip install --quiet jax jaxlib hamux fastcore diffrax numpy
    "$vpy" -c "import hamux, jax, diffrax" || { echo "[setup_hamux] hamux/jax still do not import" >&2; exit 1; }
fi
echo "[setup_hamux] ready: $("$vpy" -c 'import jax, importlib.metadata as m; print("jax", jax.__version__, "hamux", m.version("hamux"))')"
