#!/usr/bin/env bash
# The speculative-decoding table of BENCHMARKS.md: drafter × prompt set, greedy, 64 tokens per prompt,
# plain and speculative decoding timed in the same `minirt bench` run.
set -euo pipefail
f32=${1:-/tmp/minirt-bench/smollm2-F32.gguf}
for model in smollm2 "$f32"; do
  for prompts in free grounded; do
    for draft in "ngram 4" "layers:10 3"; do
      set -- $draft
      minirt bench -m "$model" --mode speculative --draft "$1" --draft-k "$2" -n 64 --prompts "$prompts" | tail -n 1 | sed "s/^/| $prompts /"
    done
  done
done
