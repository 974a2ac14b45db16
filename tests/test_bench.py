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
