#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md ("GPU backend") in one device lease: llama.cpp CUDA built there and
# measured beside minirt in the same run, on the same file (SmolLM2-135M Q4_1, 94 MiB: two transfers).
#
#   tools/gpu_campaign.sh prepare        here: the llama.cpp source tarball (from the anchors' checkout), the model
#                                        split in two, the gguf wheel; into .dev/, .m1/, .m2/, .whl/ (ignored)
#   tools/gpu_campaign.sh start          there (carry .dev .m1 .whl): install, build llama-bench detached, the GPU
#                                        tests that need no SmolLM2, wait for the build
#   tools/gpu_campaign.sh bench          there, next call within 30 s (carry .dev .m2): the model, tools/gpu_lab.py,
#                                        llama-bench and minirt bench interleaved, the SmolLM2 GPU tests,
#                                        tools/gpu_decode.py (streamed generate), ncu's DRAM bytes of one step
# Logs go to $OUT (the device tool brings them back). ../shared/anchors/README.md has the recipe this follows.
set -uo pipefail
cd "$(dirname "$0")/.."
SRC=${LLAMA_SRC:-$HOME/.cache/minirt-anchors/llama.cpp-0.3.36/src}
MODEL=${MODEL:-$HOME/.cache/minirt/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD NUMBA_CACHE_DIR=/tmp/nbc MINIRT_HOME=/tmp/mh
M=/tmp/mh/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
LB=/tmp/lc/lcsrc/build/bin/llama-bench
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case "${1:-}" in
prepare)
    for d in .dev .m1 .m2 .whl; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
    rm -rf /tmp/lcsrc && mkdir -p /tmp/lcsrc/ggml/src /tmp/lcsrc/tools .dev .m1 .m2 .whl
    (cd "$SRC" && cp -r CMakeLists.txt cmake src include common vendor LICENSE licenses /tmp/lcsrc/ &&
     cp -r ggml/CMakeLists.txt ggml/cmake ggml/include /tmp/lcsrc/ggml/ &&
     cd ggml/src && cp -r ./*.c ./*.cpp ./*.h ./*.in CMakeLists.txt ggml-cpu ggml-cuda /tmp/lcsrc/ggml/src/) || exit 1
    cp -r "$SRC/tools/llama-bench" /tmp/lcsrc/tools/
    printf 'find_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(llama-bench)\n' \
        > /tmp/lcsrc/tools/CMakeLists.txt
    tar czf .dev/lcsrc.tgz -C /tmp lcsrc
    split -b 47M "$MODEL" /tmp/m.part && mv /tmp/m.partaa .m1/ && mv /tmp/m.partab .m2/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
        "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    du -sh .dev .m1 .m2 .whl ;;
start)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    mkdir -p /tmp/lc && tar xzf .dev/lcsrc.tgz -C /tmp/lc
    (cd /tmp/lc/lcsrc && setsid nohup nice -n 19 sh -c 'cmake -B build -G Ninja -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release &&
        ninja -C build llama-bench' > /tmp/lc/build.log 2>&1 < /dev/null &)
    cp .m1/* /tmp/m.part1
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
    python3 tools/gpu_lab.py --floor-only
    timeout 400 python3 -m pytest -m gpu tests/test_gpu.py -q -ra -p no:cacheprovider --timeout 150 \
        -k "not smollm2" 2>&1 | tee "$OUT/tests1.log" | tail -8
    for _ in $(seq 80); do [ -x $LB ] && break; sleep 5; done
    tail -1 /tmp/lc/build.log; date ;;
bench)
    mkdir -p "$(dirname $M)" && cat /tmp/m.part1 .m2/* > $M && sha256sum $M
    timeout 150 python3 tools/gpu_lab.py -m $M -r 3 2>&1 | tee "$OUT/lab.log" | grep -v "^  "
    for _ in 1 2; do
        timeout 60 $LB -m $M -ngl 99 -fa 1 -p 128 -n 128 -r 5
        timeout 60 python3 -m minirt bench --device cuda -m $M -p 128 -n 128 -r 5
    done 2>&1 | tee "$OUT/bench.log" | grep "tg128\|pp128" | grep "|"
    timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -q -ra -p no:cacheprovider --timeout 140 \
        -k "smollm2" 2>&1 | tee "$OUT/tests2.log" | tail -5
    timeout 90 python3 tools/gpu_decode.py -m $M -r 3 2>&1 | tee "$OUT/decode.log" | tail -6
    timeout 60 ncu --clock-control none --profile-from-start off --csv --print-units base --metrics \
        dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum python3 tools/gpu_decode.py -m $M \
        --ncu-step > "$OUT/ncu.csv" 2>&1
    python3 -c "
import csv
rows = [r for r in csv.reader(open('$OUT/ncu.csv')) if len(r) > 10]
h = rows[0]; name, value = h.index('Metric Name'), h.index('Metric Value')
read = sum(float(r[value].replace(',', '')) for r in rows[1:] if r[name] == 'dram__bytes_read.sum')
print(f'one eager decode step: {read / 2**20:.1f} MiB read from DRAM over {len(set(r[0] for r in rows[1:]))} kernels')"
    date ;;
*)
    sed -n '2,13p' "$0"; exit 2 ;;
esac
