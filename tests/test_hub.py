"""Downloads from the Hugging Face hub through huggingface_hub, against a small stand-in for the hub on 127.0.0.1
(HF_ENDPOINT points minirt at it): file resolve with the hub's headers (X-Repo-Commit, ETag: the git blob sha1 of a
small file; X-Linked-Etag/X-Linked-Size: the sha256 and size of an LFS file), ranges for resuming, the model info
whose file list names a quantization's file, a 401 for a gated repository without a token, and a connection cut
mid-file. Files land in the Hugging Face cache (HF_HUB_CACHE, a temporary folder here); nothing here touches the
network."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

import minirt
import minirt.registry
from minirt import MinirtError
from minirt.registry import Entry, pull

COMMIT = "0123456789abcdef0123456789abcdef01234567"
BIG = np.random.default_rng(3).integers(0, 256, 3 * (1 << 20) + 4321, dtype=np.uint8).tobytes()


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class StandInHub:
    """repos: {repo: {path: bytes}}; files of 1 MB or more are LFS files. gated: repos that want a token.
    cut_after: {path: bytes} closes the connection after that many bytes of the body (once per entry)."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated: dict[str, str] = {}  # repo → the token it accepts
        self.cut_after: dict[str, int] = {}
        self.wrong_sha256: set[str] = set()
        self.requests: list[tuple[str, str, dict]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self.serve(body=False)

            def do_GET(self):
                self.serve(body=True)

            def fail(self, code: int, error_code: str, message: str):
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def serve(self, body: bool):
                url = urllib.parse.urlsplit(self.path)
                path = urllib.parse.unquote(url.path)
                hub.requests.append((self.command, path, {k.lower(): v for k, v in self.headers.items()}))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) in (4, 6):  # model_info: the file list
                    files = hub.repos.get("/".join(parts[2:4]))
                    if files is None:
                        return self.fail(404, "RepoNotFound", "Repository not found")
                    info = json.dumps({"id": "/".join(parts[2:4]), "sha": COMMIT,
                                       "siblings": [{"rfilename": p} for p in files]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(info)))
                    self.end_headers()
                    if body:
                        self.wfile.write(info)
                    return
                if len(parts) < 5 or parts[2] != "resolve":  # anything else (the client's telemetry): not here
                    return self.fail(404, "RepoNotFound", "Not found")
                owner, name, kind, _rev, *rest = parts
                repo, fname = f"{owner}/{name}", "/".join(rest)
                if kind != "resolve" or repo not in hub.repos:
                    return self.fail(404, "RepoNotFound", "Repository not found")
                if repo in hub.gated and self.headers.get("Authorization") != f"Bearer {hub.gated[repo]}":
                    return self.fail(401, "GatedRepo", f"Access to model {repo} is restricted.")
                data = hub.repos[repo].get(fname)
                if data is None:
                    return self.fail(404, "EntryNotFound", f"{fname} does not exist")
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{git_sha1(data)}"')
                if len(data) >= 1 << 20:
                    sha = hashlib.sha256(data + (b"x" if fname in hub.wrong_sha256 else b"")).hexdigest()
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if body:
                    cut = hub.cut_after.pop(fname, None)
                    self.wfile.write(data[start:] if cut is None else data[start:start + cut])
                    if cut is not None:
                        self.wfile.flush()
                        self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def gets(self, suffix: str) -> list[dict]:
        return [h for m, p, h in self.requests if m == "GET" and p.endswith(suffix)]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    h = StandInHub()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("MINIRT_HOME", str(tmp_path / "minirt"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for k in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(k, "*")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield h
    h.close()


def cached_files(root: Path) -> list[str]:
    """Files in the Hugging Face cache that hold data (not its lock files, ref names or CACHEDIR.TAG)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and ".locks" not in p.parts and "refs" not in p.parts and p.name != "CACHEDIR.TAG")


def _entry(name, repo, files, entry):
    return Entry(name, "models", {"description": "test", "source": {"kind": "hf", "repo": repo}, "files": files,
                                  "entry": entry})


def test_registry_entry_pulled_into_the_hf_cache_and_verified(hub, tmp_path, monkeypatch):
    from tests.test_errors_and_fetch import make_tiny_gpt2
    tiny = make_tiny_gpt2(tmp_path / "tiny")
    hub.repos["org/tiny"] = {f: (tiny / f).read_bytes() for f in sorted(os.listdir(tiny))}
    files = {f: {"size": len(d)} for f, d in hub.repos["org/tiny"].items()}
    monkeypatch.setitem(minirt.registry.REGISTRY, "tiny-hub", _entry("tiny-hub", "org/tiny", files, "."))
    d = pull("tiny-hub")
    assert d.is_dir() and (tmp_path / "hf") in d.resolve().parents
    assert d.resolve().name == COMMIT and d.resolve().parent.name == "snapshots"
    for f, data in hub.repos["org/tiny"].items():
        assert (d / f).read_bytes() == data
    assert minirt.registry.is_present(minirt.registry.REGISTRY["tiny-hub"])
    n = len(hub.requests)
    model = minirt.load("tiny-hub")  # in the cache now: no further requests
    assert len(hub.requests) == n
    assert len(model.generate("hi", max_tokens=3, seed=0).text()) > 0
    folder, size = minirt.registry.remove("tiny-hub")
    assert size == sum(len(x) for x in hub.repos["org/tiny"].values())
    assert not minirt.registry.is_present(minirt.registry.REGISTRY["tiny-hub"])


def test_hf_reference_by_file_and_by_quant_tag(hub):
    hub.repos["org/m-GGUF"] = {"m-Q4_K_M.gguf": BIG, "m-Q8_0.gguf": b"q8" * 1000, "README.md": b"hi",
                               "mmproj-m-Q8_0.gguf": b"proj"}
    p = pull("hf:org/m-GGUF/m-Q4_K_M.gguf")
    assert p.read_bytes() == BIG and p.name == "m-Q4_K_M.gguf"
    assert (Path(os.environ["HF_HUB_CACHE"]) / "models--org--m-GGUF" / "blobs" / hashlib.sha256(BIG).hexdigest()).is_file()
    assert pull("hf:org/m-GGUF:q8_0").read_bytes() == b"q8" * 1000  # the tag in any case; mmproj files are not models
    assert minirt.registry.resolve("hf:org/m-GGUF").name == "m-Q4_K_M.gguf"  # Q4_K_M when no tag is given
    with pytest.raises(MinirtError, match=r"no GGUF file tagged Q5_K_M \(it has Q4_K_M, Q8_0\)") as e:
        pull("hf:org/m-GGUF:Q5_K_M")
    assert "\n" not in str(e.value)
    with pytest.raises(MinirtError, match="no such file"):
        pull("hf:org/m-GGUF/missing.gguf")
    with pytest.raises(MinirtError, match="no such repository"):
        pull("hf:org/nothing:Q4_K_M")
    with pytest.raises(MinirtError, match="expected hf:OWNER/REPO"):
        pull("hf:just-a-name")
    n = len(hub.requests)
    assert pull("hf:org/m-GGUF:Q8_0").read_bytes() == b"q8" * 1000  # pulled before: from the cache, no requests
    assert len(hub.requests) == n


def test_registry_entry_by_quant_tag(hub, monkeypatch):
    """Registry entries of popular models name a repository and a quantization tag, as people type them."""
    hub.repos["Org/Model-GGUF"] = {"model-q4_k_m.gguf": BIG, "model-q8_0.gguf": b"8" * 10}
    entry = Entry("model", "models", {"description": "test", "entry": ".", "files": {},
                                      "source": {"kind": "hf", "repo": "Org/Model-GGUF", "quant": "Q4_K_M"}})
    monkeypatch.setitem(minirt.registry.REGISTRY, "model", entry)
    assert not minirt.registry.is_present(entry)
    assert pull("model").read_bytes() == BIG
    assert minirt.registry.is_present(entry) and minirt.registry.entry_dir(entry).name == COMMIT
    n = len(hub.requests)
    assert minirt.registry.resolve("model").name == "model-q4_k_m.gguf" and len(hub.requests) == n


def test_gated_repository_needs_a_token(hub, monkeypatch):
    hub.repos["meta/gated"] = {"g.gguf": b"gguf" * 100}
    hub.gated["meta/gated"] = "hf_secret"
    with pytest.raises(MinirtError, match="gated.*HF_TOKEN") as e:
        pull("hf:meta/gated/g.gguf")
    assert "\n" not in str(e.value)
    assert cached_files(Path(os.environ["HF_HUB_CACHE"])) == []
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert pull("hf:meta/gated/g.gguf").read_bytes() == b"gguf" * 100
    assert hub.gets("/g.gguf")[-1]["authorization"] == "Bearer hf_secret"


def test_connection_cut_mid_file_then_resumed(hub):
    """huggingface_hub writes 10 MB chunks: a file of 24 MB cut after 12 MB resumes at 10 MB."""
    big = BIG * 8
    hub.repos["org/big"] = {"big.gguf": big}
    hub.cut_after["big.gguf"] = 12 << 20
    cache = Path(os.environ["HF_HUB_CACHE"])
    try:
        p = pull("hf:org/big/big.gguf")  # huggingface_hub may resume on its own within the call
    except MinirtError as e:
        assert "\n" not in str(e) and "again" in str(e)
        assert not any(cache.rglob("snapshots/*/big.gguf"))  # no half-written file under the file's name
        p = pull("hf:org/big/big.gguf")  # the same command again: completes
    assert p.read_bytes() == big
    ranges = [h.get("range") for h in hub.gets("/big.gguf")]
    assert any(r and r != "bytes=0-" for r in ranges), ranges  # the second request resumed, not restarted


def test_checksum_the_hub_reports_is_checked(hub):
    hub.repos["org/bad"] = {"bad.gguf": BIG}
    hub.wrong_sha256.add("bad.gguf")
    with pytest.raises(MinirtError, match="mismatch") as e:
        pull("hf:org/bad/bad.gguf")
    assert "\n" not in str(e.value)
    assert cached_files(Path(os.environ["HF_HUB_CACHE"])) == []  # the corrupt file is not kept


def test_registry_pin_is_checked(hub, monkeypatch):
    hub.repos["org/pinned"] = {"config.json": b'{"a": 1}'}
    files = {"config.json": {"git_sha1": "0" * 40}}
    monkeypatch.setitem(minirt.registry.REGISTRY, "pinned", _entry("pinned", "org/pinned", files, "."))
    with pytest.raises(MinirtError, match="registry pins another"):
        pull("pinned")
    assert cached_files(Path(os.environ["HF_HUB_CACHE"])) == []


def test_cli_pull_hf_reference_and_offline(hub, tmp_path):
    from tests.test_errors_and_fetch import assert_one_line_error, run_cli
    hub.repos["org/m-GGUF"] = {"m-Q4_K_M.gguf": b"GGUF" * 10}
    env = {k: os.environ[k] for k in ("HF_ENDPOINT", "HF_HUB_CACHE", "MINIRT_HOME")}
    r = run_cli("pull", "hf:org/m-GGUF:Q4_K_M", env=env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == b"GGUF" * 10
    r = run_cli("pull", "hf:org/other:Q4_K_M", env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_one_line_error(r, "offline")
    assert r.seconds < 15
