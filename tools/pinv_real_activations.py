"""Residuals of the pinv transition on real SmolLM2 decode activations (FFN inputs of 200 botchan tokens,
window of the previous S tokens), per layer: python tools/pinv_real_activations.py"""
import numpy as np, minirt
from minirt.modes.pinv import transition
m = minirt.load('smollm2', exact=True)
# capture FFN inputs (post-norm h) and gate|up outputs for decode steps, per layer
caps = {i: [] for i in range(m.cfg.n_layers)}
for i, L in enumerate(m.layers):
    orig = L.up.forward
    def f(x, out, orig=orig, i=i):
        r = orig(x, out)
        caps[i].append((x.copy(), r.copy()))
        return r
    L.up.forward = f
text = open(minirt.registry.pull('botchan'), 'rb').read().decode()[5000:9000]
ids = m.tokenizer.encode(text)[:200]
c = m.new_cache(256)
for t in ids:
    m.forward([t], c)
print('| layer | S | median residual | share of rows with residual < 0.1 | transition error (median) | reuse error (median) |')
print('|---|---|---|---|---|---|')
for layer in (0, 10, 20, 29):
    X = np.concatenate([a for a, _ in caps[layer]]); Y = np.concatenate([b for _, b in caps[layer]])
    for S in (8, 32, 128):
        res, e_tr, e_re = [], [], []
        for t in range(S, len(X)):
            yh, r = transition(X[t - S:t], Y[t - S:t], X[t:t + 1])
            res.append(r[0])
            e_tr.append(np.linalg.norm(yh[0] - Y[t]) / np.linalg.norm(Y[t]))
            e_re.append(np.linalg.norm(Y[t - 1] - Y[t]) / np.linalg.norm(Y[t]))
        res = np.array(res)
        print(f'| {layer} | {S} | {np.median(res):.3f} | {np.mean(res < 0.1):.0%} | {np.median(e_tr):.3f} | {np.median(e_re):.3f} |')
