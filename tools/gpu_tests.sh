#!/usr/bin/env bash
# The GPU tests (tests/test_gpu.py, marker gpu) on a machine with CUDA and CuPy:  tools/gpu_tests.sh [pytest args]
# Works from an installed checkout (pip install -e ".[test,gpu]") or a bare copy of the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import minirt.registry" 2>/dev/null; then  # a bare copy: the package from here
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # (it reads weights/registry.json beside it)
fi
# models come from the user cache (~/.cache/minirt, or MINIRT_HOME): pull them there first on a machine
# without network (minirt pull smollm2 elsewhere, then copy the cache folder)
python3 -c "import cupy; print('CuPy', cupy.__version__, 'devices:', cupy.cuda.runtime.getDeviceCount())"
exec python3 -m pytest -m gpu tests/test_gpu.py -q -ra -p no:cacheprovider "$@"
