#!/usr/bin/env bash
# The speculative-decoding table of BENCHMARKS.md: drafter × K × prompt set, greedy, 64 tokens per prompt,
# plain and speculative decoding timed in the same `minirt bench` run, for the shipped Q4_1 file and its
# float32 re-encoding (where verifying several positions is nearly free: decoding is memory-bound).
#   tools/spec_matrix.sh [F32_GGUF] [LOWRANK_EXPORT]
# F32_GGUF defaults to /tmp/minirt-bench/smollm2-F32.gguf (made with minirt quantize if missing);
# LOWRANK_EXPORT, if given, is also tried as a drafter (e.g. minirt svd smollm2 --params 0.9 --calibration F).
set -euo pipefail
f32=${1:-/tmp/minirt-bench/smollm2-F32.gguf}
[ -f "$f32" ] || { mkdir -p "$(dirname "$f32")"; minirt quantize smollm2 "$f32" --type F32 >/dev/null; }
drafters=("ngram 2" "ngram 4" "ngram 6" "layers:10 2" "lowrank:p0.9 2" "lowrank:0.99 2")
[ -n "${2:-}" ] && drafters+=("$2 2")
for model in smollm2 "$f32"; do
  for prompts in free grounded; do
    for draft in "${drafters[@]}"; do
      set -- $draft
      minirt bench -m "$model" --mode speculative --draft "$1" --draft-k "$2" -n 64 -r 2 --prompts "$prompts" 2>/dev/null \
        | tail -n 1 | sed "s/^/| $prompts /"
    done
  done
done
