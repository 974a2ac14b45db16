"""The output head (SmolLM2's tied 49152×576 embedding) factored on its own, layers left dense: PPL, KL and
top-1 against dense float32 on the first 10 windows of botchan.txt (ctx 512), plain and activation-aware.

    python3 tools/lowrank_head.py
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minirt  # noqa: E402
from minirt.modes.lowrank import Factorizer, calibration_grams, summary  # noqa: E402
from minirt.perplexity import perplexity  # noqa: E402
from minirt.registry import pull  # noqa: E402

raw = open(pull("botchan"), "rb").read().decode()
m = minirt.load("smollm2", dequantize=True)
ref = perplexity(m, raw, chunks=10, progress=False, keep=True)
print(f"dense F32: PPL {ref.ppl:.2f}")
calib = np.asarray(m.tokenizer.encode(raw[len(raw) // 2:], add_bos=False)[:4096], np.int64)
for grams, name in ((None, "plain"), (calibration_grams(m, calib), "aware")):
    fz = Factorizer(m, grams, head=True)
    for kw in (dict(energy=0.9), dict(energy=0.99), dict(params=0.5), dict(params=0.9)):
        lm = fz.build(**kw)
        lm.layers = m.layers  # the head alone
        lm.lowrank = [f for f in lm.lowrank if f.name == "head"]
        r = perplexity(lm, raw, chunks=10, progress=False, base=ref.logprobs)
        print(f"{name} {kw}: {summary(lm)}; PPL {r.ppl:.2f}, KL {r.kl:.3f}, top-1 {r.top1:.3f}", flush=True)
