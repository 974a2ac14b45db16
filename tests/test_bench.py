"""minirt bench's depth (llama-bench's -d): the tests run after that many tokens of context."""
from __future__ import annotations

from minirt import bench


def test_depth_puts_context_before_each_test(smollm2_fast, monkeypatch):
    m = smollm2_fast
    made = []
    new_cache = m.new_cache

    def spy(capacity=None):
        made.append(new_cache(capacity))
        return made[-1]
    monkeypatch.setattr(m, "new_cache", spy)
    res = bench.run(m, p=5, n=3, r=2, bandwidth=False, depth=20)
    assert len(res.pp) == 2 and len(res.tg) == 2
    timed = made[2:]  # after the two warm-up caches: pp, tg, pp, tg
    assert [c.capacity for c in timed] == [25, 23, 25, 23]
    assert [c.pos for c in timed] == [25, 23, 25, 23]  # depth tokens, then the test's own
    assert "tg3 @ d20" in bench.report(res, "m", "Q4_1", 1, 5, 3, depth=20)


def _step_profile():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("step_profile", Path(__file__).parents[1] / "tools/step_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_profile_phases_cover_the_step(smollm2_fast):
    """tools/step_profile.py: its matrix phases run the model's matrices (layer 0's outputs equal the Linears'),
    their bytes are every matrix the step reads, and the phases add up to the step they take apart."""
    import numpy as np

    sp = _step_profile()
    m = smollm2_fast
    table = m._step_table()
    rng = np.random.default_rng(1)
    nb = table.max_k // 32
    scratch = (np.empty(table.max_rank, np.float32), np.empty(table.max_k, np.int8), np.empty(nb * 8, np.float32),
               np.empty(nb, np.float32), np.empty(nb, np.float32))
    for j, name in enumerate(("qkv", "wo", "up", "down")):
        lin = getattr(m.layers[0], name)
        x = rng.standard_normal((1, lin.in_features)).astype(np.float32)
        out = np.zeros((1, lin.out_features), np.float32)
        sp._mats(j, 1, table.tags[0], table.tags[1], table.has, table.fmt, table.sub, table.qs, table.hs, table.ms,
                 table.fs, table.bs, x, out, *scratch, 1)
        np.testing.assert_array_equal(out, lin.forward(x, np.empty_like(out)))
    import numba
    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # timed by the thread's CPU time: preemption on a loaded machine left out
    try:
        p = sp.profile(m, depth=16, reps=7, bandwidth=30e9)
        p4 = sp.profile(m, depth=16, reps=5, bandwidth=30e9, rows=4)  # the server's step of 4 sequences
    finally:
        numba.set_num_threads(threads)
    assert sum(p["nbytes"].values()) == m.weight_bytes
    assert p["regions"] == 6 * m.cfg.n_layers + 2
    assert all(v > 0 for v in p["sec"].values())
    assert p["layers"] < p["total"]
    assert 0.7 < sum(p["sec"].values()) / p["total"] < 1.3  # measured 0.98-1.01 (1 thread, 2 cores under load)
    assert p4["layers"] < p4["total"] and 0.7 < sum(p4["sec"].values()) / p4["total"] < 1.3
    assert "(4 rows)" in sp.report(p4, "smollm2") and "BatchStep" in sp.report(p4, "smollm2")
    text = sp.report(p, "smollm2")
    for phase in ("qkv", "gate/up", "down", "head", "attention", "norms+rope+act", "act quant", "overhead"):
        assert f"| {phase}" in text


def test_speculative_table_times_decoding_apart_from_the_prompt(smollm2_fast):
    """The speculative row gives the end-to-end speedup and the decoding-only one (after the first token),
    from the generations' own timings; the output is compared with plain decoding's."""
    prompt = "The cat sat on the mat. The cat sat on the mat. The cat sat on the"
    res = bench.run_speculative(smollm2_fast, [prompt], n=12, draft="ngram", k=4)
    assert res.identical and res.steps >= 1
    assert len(res.dense_decode_s) == len(res.spec_decode_s) == 1
    assert 0 < res.dense_decode_s[0] < res.dense_s[0] and 0 < res.spec_decode_s[0] < res.spec_s[0]
    cells = bench.report_speculative("m", res, "ngram", 4).strip("|").split("|")
    assert len(cells) == 10
    assert cells[8].strip() == f"{res.dense_decode_s[0] / res.spec_decode_s[0]:.2f}x"
