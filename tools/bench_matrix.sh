#!/usr/bin/env bash
# The benchmarks table of BENCHMARKS.md: SmolLM2-135M in F32, F16, Q8_0, Q4_0 (re-encoded from the shipped
# Q4_1 with `minirt quantize`) and Q4_1, at 1 and 2 threads: pp128/tg128 (llama-bench style), peak RSS of a
# 128-token generation, and perplexity on botchan.txt (ctx 512, first 20 windows).
set -euo pipefail
out=${1:-/tmp/minirt-bench}
mkdir -p "$out"
src=$(minirt pull smollm2)
for t in F32 F16 Q8_0 Q4_0; do
  [ -f "$out/smollm2-$t.gguf" ] || minirt quantize "$src" "$out/smollm2-$t.gguf" --type "$t" >/dev/null
done
for f in "$out/smollm2-F32.gguf" "$out/smollm2-F16.gguf" "$out/smollm2-Q8_0.gguf" "$out/smollm2-Q4_0.gguf" "$src"; do
  for th in 1 2; do
    echo "== $(basename "$f") threads=$th"
    minirt bench -m "$f" -t "$th" -p 128 -n 128 -r 5 | tail -n 2
    /usr/bin/time -f "peak RSS %M KB" minirt generate -m "$f" -t "$th" -p "Once upon a time" -n 128 --temperature 0 2>&1 >/dev/null | tail -n 2
  done
  minirt perplexity -m "$f" -f botchan --ctx 512 --chunks 20 2>/dev/null
done
