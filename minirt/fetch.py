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
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from .errors import MinirtError

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


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal, or forced)."""

    def __init__(self, label: str, total: int | None, done: int = 0):
        self.label, self.total, self.done = label, total, done
        self.live = sys.stderr.isatty()
        self.t0 = self.last = time.monotonic()
        self.start = done

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.live and now - self.last > 0.2:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = (self.done - self.start) / max(now - self.t0, 1e-9) / 1e6
        if self.total:
            frac = self.done / self.total
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {self.done / 1e6:8.1f}/{self.total / 1e6:.1f} MB "
                             f"{rate:6.1f} MB/s")
        else:
            sys.stderr.write(f"\r{self.label} {self.done / 1e6:8.1f} MB {rate:6.1f} MB/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.live:
            self._draw(time.monotonic())
            sys.stderr.write("\n")
        else:
            sys.stderr.write(f"{self.label}: {self.done / 1e6:.1f} MB\n")


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
            bar = Progress(dest.name, total, have)
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


def pip_fetch(requirement: str, dist: str, files: dict[str, dict], dest_dir: Path) -> None:
    """Fetch a package from the configured package index with pip and extract verified files from it.

    files maps a file name in dest_dir to its spec: the archive member it comes from and its sha256.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, requirement]
        cmd += ["--no-binary", ":all:"] if dist == "sdist" else ["--only-binary", ":all:"]
        sys.stderr.write(f"fetching {requirement} with pip …\n")
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise MinirtError(f"pip download {requirement} failed: {e}") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise MinirtError(f"pip download {requirement} failed ({last}); check your connection to the package index")
        archives = [p for p in Path(tmp).iterdir() if p.is_file()]
        if len(archives) != 1:
            raise MinirtError(f"pip download {requirement} produced {len(archives)} files, expected 1")
        archive = archives[0]
        for name, spec in files.items():
            member, out = spec["member"], dest_dir / (name + ".part")
            try:
                if archive.suffix in (".whl", ".zip"):
                    with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                else:
                    with tarfile.open(archive) as t:
                        src = t.extractfile(member)
                        if src is None:
                            raise KeyError(member)
                        with src, open(out, "wb") as dst:
                            shutil.copyfileobj(src, dst, CHUNK)
            except KeyError:
                out.unlink(missing_ok=True)
                raise MinirtError(f"{archive.name} has no member {member}") from None
            try:
                verify(out, spec, name)
            except MinirtError:
                out.unlink(missing_ok=True)
                raise
            os.replace(out, dest_dir / name)
