"""Make tests/fixtures/gemma3_hf_logits.npz: Hugging Face transformers' logits and greedy ids for the real
Gemma 3 270M Q4_K_M file (the registry's gemma3-270m), which tests/test_gemma3.py compares minirt --exact with.

transformers dequantizes the GGUF to float32 and runs its own Gemma 3 (about 4 minutes to load on a 2-core
machine), so this runs once; the fixture is small:
    nice -n 5 python tools/gemma3_hf_fixture.py [GGUF] [OUT.npz]
For each prompt: its ids (tokenizer from the same GGUF, BOS added), GREEDY_STEPS greedy ids with the top-2
gap of each step, and for every position of prompt + greedy ids the TOP_K largest logits (ids, values) plus
the logits of RANDOM_IDS fixed random ids (so the low end of the distribution is checked too) and the
largest |logit| of the row."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):\n",
           "In 1969, Neil Armstrong", "Les mathématiques sont"]
GREEDY_STEPS = 24
TOP_K = 64
RANDOM_IDS = 64


def reference(gguf_path: Path, prompts=PROMPTS, steps: int = GREEDY_STEPS):
    """transformers' (ids, greedy ids, greedy top-2 gaps, full-sequence logits (T, vocab)) per prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = str(gguf_path.parent), gguf_path.name
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    print(f"loaded in {time.time() - t0:.0f} s", file=sys.stderr)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, add_special_tokens=True)["input_ids"]
            seq, gaps = list(ids), []
            for _ in range(steps):  # plain argmax over full recomputation: no cache subtleties
                row = model(torch.tensor([seq])).logits[0, -1].float().numpy()
                top2 = np.sort(row)[-2:]
                gaps.append(float(top2[1] - top2[0]))
                seq.append(int(row.argmax()))
            logits = model(torch.tensor([seq])).logits[0].float().numpy()
            out.append((ids, seq[len(ids):], gaps, logits))
            print(f"{p!r} → {tok.decode(seq[len(ids):])!r}", file=sys.stderr)
    return out


def main():
    from minirt.registry import pull
    gg = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(pull("gemma3-270m"))
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parents[1] / "tests/fixtures/gemma3_hf_logits.npz"
    rng = np.random.default_rng(0)
    arrays = {}
    for n, (ids, greedy, gaps, logits) in enumerate(reference(gg)):
        top = np.argsort(-logits, axis=1)[:, :TOP_K]
        rand = rng.integers(0, logits.shape[1], (len(logits), RANDOM_IDS))
        cols = np.concatenate([top, rand], axis=1)
        arrays.update({f"p{n}_ids": np.array(ids, np.int32), f"p{n}_greedy": np.array(greedy, np.int32),
                       f"p{n}_gaps": np.array(gaps, np.float32), f"p{n}_cols": cols.astype(np.int32),
                       f"p{n}_vals": np.take_along_axis(logits, cols, 1).astype(np.float32),
                       f"p{n}_absmax": np.abs(logits).max(axis=1).astype(np.float32)})
    arrays["prompts"] = np.array(PROMPTS)
    np.savez_compressed(dst, **arrays)
    print(f"wrote {dst} ({dst.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
