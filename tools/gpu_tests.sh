#!/usr/bin/env bash
# The GPU tests (tests/test_gpu.py, marker gpu) on a machine with CUDA and CuPy:  tools/gpu_tests.sh [pytest args]
# Works from an installed checkout (pip install -e ".[test,gpu]") or a bare copy of the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import minirt.registry" 2>/dev/null; then  # a bare copy: the package from here
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  [ -e minirt/weights ] || ln -s ../weights minirt/weights  # what pip's package-dir mapping provides
  export MINIRT_HOME="${MINIRT_HOME:-$PWD/weights}"
fi
python3 -c "import cupy; print('CuPy', cupy.__version__, 'devices:', cupy.cuda.runtime.getDeviceCount())"
exec python3 -m pytest -m gpu tests/test_gpu.py -q -ra -p no:cacheprovider "$@"
