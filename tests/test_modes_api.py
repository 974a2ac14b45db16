"""minirt.load(name, mode=…, **options): options checked before anything is read, the mode composed on the
model, and the model's generate() decoding in it unless told otherwise."""
from __future__ import annotations

from pathlib import Path

import pytest

import minirt
from minirt.errors import MinirtError

MISSING = "/nonexistent/model.gguf"  # loading it would fail with "not found": the option errors come first


@pytest.mark.parametrize("mode,options,needle", [
    ("turbo", {}, "unknown mode 'turbo'"),
    ("dense", dict(energy=0.9), "mode 'dense' takes no options, not energy"),
    ("pinv", dict(block=3), "mode 'pinv' takes window, tol, not block"),
    ("pinv", dict(window=0), "--pinv-window"),
    ("pinv", dict(tol=float("nan")), "--pinv-tol"),
    ("jacobi", dict(block=8), "--block"),
    ("jacobi", dict(pinv_window=5000), "--pinv-window"),
    ("speculative", dict(draft_k=0), "--draft-k"),
    ("speculative", dict(draft="ngram:0"), "ngram"),
    ("lowrank", dict(energy=1.5), "energy must be in (0, 1]"),
    ("lowrank", dict(energy=0.9, rank=4), "exactly one"),
    ("lowrank", dict(rank=0), "rank must be ≥ 1"),
    ("lowrank", dict(factor_type="Q4_0"), "factor type"),
    ("lowrank", dict(calibration=Path("/nonexistent/notes.txt")), "calibration file"),
    ("lowrank", dict(calibration="some text", calib_tokens=1), "--calib-tokens"),
])
def test_options_are_checked_before_loading(mode, options, needle):
    with pytest.raises(MinirtError) as e:
        minirt.load(MISSING, mode=mode, **options)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_pinv_on_cuda_is_refused_before_loading():
    with pytest.raises(MinirtError, match="CPU only"):
        minirt.load(MISSING, device="cuda", mode="pinv")


def test_the_model_remembers_its_mode(smollm2_path):
    prompt = "Repeat: one two three four. Repeat: one two three four. Repeat:"
    plain = minirt.load(smollm2_path)
    want = plain.generate(prompt, max_tokens=12, temperature=0)
    want.text()
    assert plain.mode == "dense" and want.mode_stats is None
    spec = minirt.load(smollm2_path, mode="speculative", draft="ngram", draft_k=3)
    assert spec.mode == "speculative" and spec.mode_options == dict(draft="ngram", draft_k=3)
    got = spec.generate(prompt, max_tokens=12, temperature=0)
    got.text()
    assert got.stats.tokens == want.stats.tokens
    assert got.drafter is not None and got.mode_options["draft_k"] == 3 and got.spec.steps > 0
    dense = spec.generate(prompt, max_tokens=12, temperature=0, mode="dense")  # an override
    dense.text()
    assert dense.drafter is None and dense.stats.tokens == want.stats.tokens
    with pytest.raises(MinirtError, match="mode 'dense' takes no options, not draft"):
        spec.generate(prompt, mode="dense", draft="ngram")
    jac = minirt.load(smollm2_path, mode="jacobi", block=3, pinv_tol=0.3)
    assert jac.pinv.tol == 0.3
    g = jac.generate(prompt, max_tokens=12, temperature=0)
    g.text()
    assert g.stats.tokens == want.stats.tokens and g.jacobi.blocks > 0 and g.block == 3
    assert jac.pinv.stats.rows > 0                                  # the transition ran in the iterations
    rows = jac.pinv.stats.rows
    g = jac.generate(prompt, max_tokens=12, temperature=0, mode="dense")
    g.text()
    assert jac.pinv.stats.rows == rows and g.stats.tokens == want.stats.tokens  # dense stays exact
    with pytest.raises(MinirtError, match="greedily"):
        jac.generate(prompt, max_tokens=4)


def test_lowrank_export_runs_as_it_is(tmp_path):
    """A low-rank export loads in mode lowrank as it is; factoring options on it are refused."""
    from minirt.modes.lowrank import export

    from .test_parity import make_llama, write_llama_gguf
    src = tmp_path / "tiny.gguf"
    write_llama_gguf(src, make_llama(tied=True))
    m = minirt.load(src, mode="lowrank", rank=4)
    assert m.mode == "lowrank" and all(f.rank == 4 for f in m.lowrank)
    out = export(m, tmp_path / "lr", progress=False)
    again = minirt.load(out, mode="lowrank")
    assert [f.rank for f in again.lowrank] == [f.rank for f in m.lowrank]
    for bad in (dict(rank=4), dict(factor_type="F32"), dict(lowrank_head=True)):
        with pytest.raises(MinirtError, match="low-rank export already"):
            minirt.load(out, mode="lowrank", **bad)
