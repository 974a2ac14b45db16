"""Modes: what `minirt.load(name, mode=…, **options)` and `minirt generate --mode …` put onto a loaded model.

    mode         load options (API name = CLI flag)                      what it composes           module
    dense        —                                                        the model as loaded
    lowrank      energy | rank | params, calibration, calib_tokens,       matrices factored on load  lowrank.py
                 factor_type, lowrank_head (none on a low-rank export)    (an export runs as it is)
    pinv         window (--pinv-window), tol (--pinv-tol)                 FFN gate|up rows predicted pinv.py
    speculative  draft, draft_k                                           drafts verified in one call speculative.py
    jacobi       block, pinv_window, pinv_tol (the transition in its       blocks refined, verified   jacobi.py
                 iterations; 0: none)

check() validates the options before anything is loaded or downloaded, with the CLI's one-line errors;
compose() builds the mode onto the loaded model, which then remembers it (model.mode, model.mode_options), so
model.generate(prompt) decodes in that mode. How generation runs for each mode is registered with
minirt.generate here: generate itself imports no mode.
"""
from __future__ import annotations

import math
import os

from . import jacobi, speculative
from ..errors import MinirtError
from ..generate import Decoding, register

LOWRANK = dict(energy=None, rank=None, params=None, calibration=None, calib_tokens=4096, factor_type="F32",
               lowrank_head=False)
OPTIONS: dict[str, dict] = {  # every mode's options and their defaults (the CLI's defaults)
    "dense": {},
    "lowrank": LOWRANK,
    "speculative": dict(draft="ngram", draft_k=4),
    "pinv": dict(window=16, tol=0.1),
    "jacobi": dict(block=4, pinv_window=16, pinv_tol=0.1),
}
MODES = tuple(OPTIONS)
FLAGS = dict(window="--pinv-window", tol="--pinv-tol", pinv_window="--pinv-window", pinv_tol="--pinv-tol",
             calib_tokens="--calib-tokens")


def _name(option: str) -> str:
    """How an error names an option: its API name and, where it differs, its CLI flag."""
    return f"{option} ({FLAGS[option]})" if option in FLAGS else option


def check(mode: str, options: dict, device: str = "cpu") -> dict:
    """The mode's options with their defaults filled in, checked (one-line MinirtError) before any loading.
    device: the resolved device ("cpu" or "cuda")."""
    if mode not in OPTIONS:
        raise MinirtError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
    unknown = sorted(set(options) - set(OPTIONS[mode]))
    if unknown:
        takes = f"takes {', '.join(OPTIONS[mode])}" if OPTIONS[mode] else "takes no options"
        raise MinirtError(f"mode '{mode}' {takes}, not {', '.join(unknown)}")
    o = {**OPTIONS[mode], **options}
    if mode == "lowrank":
        _check_lowrank(o)
    if mode == "speculative":
        speculative.check_draft(o["draft"])
        speculative.check_draft_k(o["draft_k"])
    if mode == "pinv":
        _check_pinv(o, "window", "tol")
    if mode == "jacobi":
        _check_pinv(o, "pinv_window", "pinv_tol")
        jacobi.check_block(o["block"])
    if device == "cuda" and (mode == "pinv" or mode == "jacobi" and o["pinv_tol"] > 0):
        raise MinirtError(f"--mode {mode} with the transition runs on the CPU only: drop --device cuda"
                          + (" (or give pinv_tol=0, --pinv-tol 0)" if mode == "jacobi" else ""))
    return o


def _check_pinv(o: dict, window: str, tol: str) -> None:
    if not 1 <= o[window] <= 4096:
        raise MinirtError(f"{_name(window)} must be between 1 and 4096, got {o[window]}")
    if not (math.isfinite(o[tol]) and o[tol] >= 0):
        raise MinirtError(f"{_name(tol)} must be a finite number ≥ 0, got {o[tol]}")


def _check_lowrank(o: dict) -> None:
    from .lowrank import STORAGE, check_choice
    if (o["energy"], o["rank"], o["params"]) != (None, None, None):  # none: energy 0.9 (or an export as it is)
        check_choice(o["energy"], o["rank"], o["params"])
    if o["factor_type"] not in STORAGE:
        raise MinirtError(f"unknown factor type (--factor-type) {o['factor_type']!r}: choose one of "
                          f"{', '.join(STORAGE)}")
    cal = o["calibration"]
    if cal is not None:
        if o["calib_tokens"] < 2:
            raise MinirtError(f"{_name('calib_tokens')} must be ≥ 2, got {o['calib_tokens']}")
        if isinstance(cal, os.PathLike) and not os.path.isfile(cal):
            raise MinirtError(f"calibration file {os.fspath(cal)} does not exist")
        if not isinstance(cal, (str, os.PathLike)):
            raise MinirtError("calibration takes a text (str) or a text file (a pathlib.Path)")


def compose(model, mode: str, options: dict, given=()):
    """The loaded (CPU) model with its mode built on; options as check() returned them, given: the names the
    caller set (a low-rank export refuses factoring options). The result remembers mode and options."""
    if mode == "lowrank":
        model = _lowrank(model, options, given)
    elif mode == "pinv":
        from .pinv import with_pinv
        model = with_pinv(model, options["window"], options["tol"])
    elif mode == "jacobi" and options["pinv_tol"] > 0:
        from .pinv import with_pinv
        model = with_pinv(model, options["pinv_window"], options["pinv_tol"])
        model.pinv.enabled = False  # on only inside Jacobi iterations: generate(mode="dense") stays exact
    return remember(model, mode, options)


def remember(model, mode: str, options: dict):
    """model.mode and model.mode_options: what model.generate decodes with by default."""
    model.mode, model.mode_options = mode, dict(options)
    return model


def _lowrank(model, o: dict, given):
    from .lowrank import calibration_tokens, with_lowrank
    from ..registry import read_text
    if getattr(model, "lowrank", None):  # a low-rank export: run as it is
        if set(given) & set(LOWRANK):
            src = model.source.name if model.source is not None else "the model"
            raise MinirtError(f"{src} is a low-rank export already; drop the factoring options "
                              "(--energy/--rank/--params/--calibration/--calib-tokens/--factor-type/--lowrank-head)")
        return model
    energy, rank, params = o["energy"], o["rank"], o["params"]
    if (energy, rank, params) == (None, None, None):
        energy = 0.9
    calib = None
    if o["calibration"] is not None:
        cal = o["calibration"]
        label = f"calibration file {os.fspath(cal)}" if isinstance(cal, os.PathLike) else "the calibration text"
        text = read_text(cal, label) if isinstance(cal, os.PathLike) else cal
        calib = calibration_tokens(model, text, o["calib_tokens"], label)
    return with_lowrank(model, energy, rank, params, calibration=calib, storage=o["factor_type"],
                        head=o["lowrank_head"], progress=True)


# ---- how generate runs each mode -----------------------------------------------------------------------

def _needs(attr: str, message: str):
    def start(gen):
        if not getattr(gen.model, attr, None):
            raise MinirtError(message)
    return start


register("lowrank", Decoding(start=_needs(
    "lowrank", "mode 'lowrank' needs a factored model: minirt.load(name, mode='lowrank', energy=E) "
    "(or minirt.modes.lowrank.with_lowrank(model, energy=E))")))
register("speculative", Decoding(options=dict(OPTIONS["speculative"]), start=speculative.start,
                                 tokens=speculative.tokens, ahead=lambda draft, draft_k: draft_k))
register("pinv", Decoding(start=_needs(
    "pinv", "mode 'pinv' needs a model with the transition installed: minirt.load(name, mode='pinv', window=S, "
    "tol=T) (or minirt.modes.pinv.with_pinv(model, window, tol))")))
register("jacobi", Decoding(options=dict(block=OPTIONS["jacobi"]["block"]), start=jacobi.start,
                            tokens=jacobi.tokens, ahead=lambda block: block))

__all__ = ["MODES", "OPTIONS", "check", "compose", "remember"]
