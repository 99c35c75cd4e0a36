# Sourced by the other scripts: a Python 3.12 virtual environment in .venv with the pinned stack
# (torch 2.11.0 built for CUDA 13.0, nvcc 13.0 and CUTLASS 4.2 from wheels), and CUDA_HOME
# pointing at the toolkit those wheels form. Needs network access to PyPI on first use.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${INDEXCACHE_VENV:-$repo_root/.venv}"
# Python 3.12 as on the GPU machine; under pyenv its shim needs the version selected first.
if [ -z "${PYTHON:-}" ] && command -v pyenv >/dev/null 2>&1; then
  pyenv_312=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | tail -n 1 || true)
  if [ -n "$pyenv_312" ]; then export PYENV_VERSION="$pyenv_312"; fi
fi
python_bin="${PYTHON:-python3.12}"

if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"

python -m pip install --quiet --disable-pip-version-check \
  "torch==2.11.0" \
  "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" \
  "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-runtime==13.0.96" \
  "nvidia-cutlass==4.2.0.0" \
  "pybind11>=2.12" "ninja" "cmake>=3.26" "setuptools>=68" "wheel" \
  "numpy" "pytest" "hypothesis"

# The CUDA 13 wheels install one toolkit tree under nvidia/cu13, but with lib/ instead of the
# lib64/ that nvcc.profile names and without the unversioned .so names the CMake finders look
# for; add both as links inside the venv (idempotent).
CUDA_HOME=$(python -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
export CUDA_HOME
ln -sfn lib "$CUDA_HOME/lib64"
for versioned in "$CUDA_HOME"/lib/lib*.so.*; do
  unversioned="${versioned%%.so.*}.so"
  [ -e "$unversioned" ] || ln -s "$(basename "$versioned")" "$unversioned"
done
export PATH="$CUDA_HOME/bin:$PATH"
