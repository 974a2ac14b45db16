"""minirt's one user cache: models, data, low-rank exports and compiled kernels, whatever the install mode.

~/.cache/minirt by default ($XDG_CACHE_HOME/minirt where that is set); MINIRT_HOME moves it.
"""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    if os.environ.get("MINIRT_HOME"):
        return Path(os.environ["MINIRT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "minirt"
