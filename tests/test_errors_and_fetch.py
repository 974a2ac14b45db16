"""Errors a user can cause, and the download machinery.

Every bad input to the CLI must give exactly one line on stderr starting with "minirt: error:", a
non-zero exit status and no traceback, and must leave nothing (half-)written in the cache. The CLI is
run as a subprocess, mostly against a tiny random GPT-2 folder built here (loads in well under a
second); SmolLM2 is loaded only in test_smollm2_context_limits, where its three loads run side by side.

Hub downloads are tested in test_hub.py against a stand-in for the hub; nothing here touches the network:
subprocesses get a dead HF_ENDPOINT, an empty Hugging Face cache and PIP_NO_INDEX=1.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import minirt
import minirt.registry
from minirt import MinirtError

REPO = Path(__file__).resolve().parents[1]
DEAD = "http://127.0.0.1:9"  # discard port: connection refused at once
NO_NET = {"HF_ENDPOINT": DEAD, "PIP_NO_INDEX": "1", "no_proxy": "*", "NO_PROXY": "*",
          "HF_HUB_CACHE": tempfile.mkdtemp(prefix="minirt-test-hf-")}  # not the user's Hugging Face cache


# ---------------------------------------------------------------------------------------------- helpers

def run_cli(*args, env: dict | None = None, popen: bool = False, timeout: float = 60):
    """Run `python -m minirt ARGS`; returns CompletedProcess with .seconds (or a Popen with popen=True)."""
    cmd = [sys.executable, "-m", "minirt", *map(str, args)]
    full_env = {**os.environ, **NO_NET, **(env or {})}
    kw = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
              cwd=REPO)
    if popen:
        return subprocess.Popen(cmd, **kw)
    t0 = time.monotonic()
    r = subprocess.run(cmd, timeout=timeout, **kw)
    r.seconds = time.monotonic() - t0
    return r


def assert_one_line_error(r, *needles: str) -> str:
    """Non-zero exit, no traceback, exactly one non-empty stderr line 'minirt: error: …' containing needles."""
    assert r.returncode != 0, f"expected failure, got exit 0; stdout={r.stdout!r} stderr={r.stderr!r}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{r.stderr}"
    assert lines[0].startswith("minirt: error:"), lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"
    return lines[0]


def files_under(d: Path) -> list[Path]:
    return [p for p in d.rglob("*")] if d.exists() else []


@pytest.fixture
def cache(tmp_path):
    """An empty MINIRT_HOME for one test; afterwards it must still hold nothing at all."""
    d = tmp_path / "cache"
    d.mkdir()
    yield d
    assert files_under(d) == [], f"cache left with {files_under(d)}"


# ------------------------------------------------------------------------- a tiny GPT-2 folder (random)

def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def st_header(obj) -> bytes:
    """A safetensors file that is just an 8-byte length and the given JSON header."""
    h = json.dumps(obj).encode()
    return struct.pack("<Q", len(h)) + h


def make_tiny_gpt2(folder: Path) -> Path:
    """config.json + model.safetensors + vocab.json/merges.txt: 1 layer, dim 8, 257 byte-level tokens, ctx 32."""
    V, D, P = 257, 8, 32
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="gpt2", vocab_size=V, n_embd=D, n_layer=1, n_head=2, n_positions=P,
        bos_token_id=256, eos_token_id=256)))
    rng = np.random.default_rng(0)
    r = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    t = {"wte.weight": r(V, D), "wpe.weight": r(P, D), "ln_f.weight": np.ones(D), "ln_f.bias": np.zeros(D)}
    p = "h.0."
    t.update({p + "ln_1.weight": np.ones(D), p + "ln_1.bias": np.zeros(D),
              p + "ln_2.weight": np.ones(D), p + "ln_2.bias": np.zeros(D),
              p + "attn.c_attn.weight": r(D, 3 * D), p + "attn.c_attn.bias": r(3 * D),
              p + "attn.c_proj.weight": r(D, D), p + "attn.c_proj.bias": r(D),
              p + "mlp.c_fc.weight": r(D, 4 * D), p + "mlp.c_fc.bias": r(4 * D),
              p + "mlp.c_proj.weight": r(4 * D, D), p + "mlp.c_proj.bias": r(D)})
    (folder / "model.safetensors").write_bytes(safetensors_bytes(t))
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    vocab["<|endoftext|>"] = 256
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "tiny-gpt2")


def test_tiny_model_is_valid(tiny, cache):
    """Control: the folder the corrupt variants start from loads and generates."""
    r = run_cli("generate", "-m", tiny, "-p", "hello", "-n", "3", "--seed", "0", env={"MINIRT_HOME": str(cache)})
    assert r.returncode == 0, r.stderr
    assert "stop: length" in r.stderr


# ---------------------------------------------------------------------------- model names and paths

def test_unknown_model_name(cache):
    r = run_cli("generate", "--model", "nosuchmodel", "-p", "hi", env={"MINIRT_HOME": str(cache)})
    assert_one_line_error(r, "unknown model", "nosuchmodel")


@pytest.mark.parametrize("path", ["/nonexistent/x.gguf", "/nonexistent/folder", "nope.gguf"])
def test_model_path_does_not_exist(path, cache):
    r = run_cli("generate", "--model", path, "-p", "hi", env={"MINIRT_HOME": str(cache)})
    assert_one_line_error(r, "does not exist")


def test_kv_type_is_checked_before_loading_and_reaches_every_command():
    from minirt.cli import build_parser
    with pytest.raises(MinirtError, match="KV cache type must be one of f32, f16"):
        minirt.load("/nonexistent/x.gguf", kv_type="q8_0")
    for cmd in (["generate"], ["chat"], ["perplexity", "-f", "botchan"], ["bench"], ["serve"]):
        other = "f32" if cmd == ["serve"] else "f16"
        assert build_parser().parse_args(cmd + ["--kv-type", other]).kv_type == other
        assert build_parser().parse_args(cmd + ["-ctk", other]).kv_type == other
        # the default: exact everywhere, float16 in the server (llama-server's: its slots are its memory)
        assert build_parser().parse_args(cmd).kv_type == ("f16" if cmd == ["serve"] else "f32")
    r = run_cli("generate", "--model", "/nonexistent/x.gguf", "--kv-type", "q8_0", "-p", "hi")
    assert_one_line_error(r, "--kv-type", "f16")


def test_model_path_is_neither_gguf_nor_folder(tiny, cache):
    r = run_cli("generate", "--model", tiny / "config.json", "-p", "hi", env={"MINIRT_HOME": str(cache)})
    assert_one_line_error(r, "not a GGUF file")


# --------------------------------------------------------------------------------------- broken GGUF

@pytest.fixture(scope="module")
def bad_ggufs(tmp_path_factory, smollm2_path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    with open(smollm2_path, "rb") as src:
        for label, n in (("first-1MB", 1 << 20), ("first-60MB", 60 << 20)):
            src.seek(0)
            out[label] = d / f"{label}.gguf"
            out[label].write_bytes(src.read(n))
    rng = np.random.default_rng(1)
    out["magic+random"] = d / "random.gguf"
    out["magic+random"].write_bytes(b"GGUF" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out["magic+v3+random"] = d / "random-v3.bin"  # no .gguf suffix: found by its magic; a valid version
    out["magic+v3+random"].write_bytes(b"GGUF" + struct.pack("<I", 3) + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out["empty"] = d / "empty.gguf"
    out["empty"].write_bytes(b"")
    return out


@pytest.mark.parametrize("label", ["first-1MB", "first-60MB", "magic+random", "magic+v3+random", "empty"])
def test_broken_gguf(label, bad_ggufs, cache):
    r = run_cli("generate", "--model", bad_ggufs[label], "-p", "hi", env={"MINIRT_HOME": str(cache)})
    assert_one_line_error(r, str(bad_ggufs[label]))
    assert r.seconds < 15


# ------------------------------------------------------------------------------- broken safetensors

def _good_st(tiny: Path) -> bytes:
    return (tiny / "model.safetensors").read_bytes()


ST_CASES = {
    "truncated": (lambda g: g[: len(g) // 2], "truncated"),
    "truncated-in-header": (lambda g: g[:20], "corrupt safetensors header"),
    "shorter-than-8-bytes": (lambda g: g[:4], "too short"),
    "empty": (lambda g: b"", "too short"),
    "garbage-header": (lambda g: struct.pack("<Q", 64) + b"\xff" * 64 + g[72:], "not JSON"),
    "header-length-past-eof": (lambda g: struct.pack("<Q", len(g)) + g[8:], "corrupt safetensors header"),
    "header-length-huge": (lambda g: struct.pack("<Q", 1 << 62) + g[8:], "corrupt safetensors header"),
    "tensor-offsets-past-eof": (lambda g: st_header({"wte.weight": {"dtype": "F32", "shape": [1000],
                                                                     "data_offsets": [0, 4000]}}) + b"\0" * 16,
                                "outside the file"),
    "unsupported-dtype": (lambda g: st_header({"wte.weight": {"dtype": "I64", "shape": [1],
                                                               "data_offsets": [0, 8]}}) + b"\0" * 8, "dtype"),
    "no-tensors": (lambda g: st_header({}), "missing tensor"),
}

ST_BUGS = {  # valid JSON of the wrong shape reaches code that indexes it blindly
    "header-is-a-list": lambda g: st_header([1, 2, 3]),
    "tensor-entry-not-a-dict": lambda g: st_header({"wte.weight": 5}),
    "tensor-without-shape": lambda g: st_header({"wte.weight": {"dtype": "F32", "data_offsets": [0, 4]}}) + b"\0" * 4,
    "non-integer-offsets": lambda g: st_header({"wte.weight": {"dtype": "F32", "shape": [1],
                                                               "data_offsets": ["a", "b"]}}) + b"\0" * 4,
}


def _corrupt_copy(tiny: Path, dest: Path, data: bytes) -> Path:
    shutil.copytree(tiny, dest)
    (dest / "model.safetensors").write_bytes(data)
    return dest


@pytest.mark.parametrize("label", list(ST_CASES))
def test_corrupt_safetensors(label, tiny, tmp_path, cache):
    make, needle = ST_CASES[label]
    folder = _corrupt_copy(tiny, tmp_path / "m", make(_good_st(tiny)))
    r = run_cli("generate", "--model", folder, "-p", "hi", env={"MINIRT_HOME": str(cache)})
    assert_one_line_error(r, needle)


@pytest.mark.parametrize("label", list(ST_BUGS))
def test_corrupt_safetensors_header_structure(label, tiny, tmp_path, cache):
    folder = _corrupt_copy(tiny, tmp_path / "m", ST_BUGS[label](_good_st(tiny)))
    r = run_cli("generate", "--model", folder, "-p", "hi", env={"MINIRT_HOME": str(cache)})
    assert_one_line_error(r)


@pytest.mark.parametrize("config, needle", [
    (None, "no config.json"),
    ("{not json", "config.json"),
    ('{"model_type": "bert"}', "not supported"),
    ('{"model_type": "gpt2"}', "config"),
    ("[]", "config"),
])
def test_bad_config_json(config, needle, tiny, tmp_path, cache):
    folder = shutil.copytree(tiny, tmp_path / "m")
    if config is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text(config)
    r = run_cli("generate", "--model", folder, "-p", "hi", env={"MINIRT_HOME": str(cache)})
    assert_one_line_error(r, needle)


# ----------------------------------------------------------------------------------------- bad flags

@pytest.mark.parametrize("args, needle", [
    (["--bogus"], "unrecognized arguments"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "top-p"),
    (["--max-tokens", "-3"], "max tokens"),
    (["--threads", "0"], "threads"),
    (["--mode", "nosuchmode"], "invalid choice"),
    (["--mode", "pinv", "--pinv-window", "0"], "--pinv-window"),
    (["--mode", "pinv", "--pinv-tol", "nan"], "--pinv-tol"),
    (["--mode", "jacobi", "--temperature", "0", "--block", "9"], "--block"),
    (["--mode", "jacobi"], "greedily"),
    (["--mode", "lowrank", "--energy", "1.5"], "energy"),
    (["--mode", "lowrank", "--rank", "0"], "rank"),
    (["--top-k", "abc"], "invalid int"),
    (["--top-k", "-1"], "top-k"),
    (["--min-p", "1"], "min-p"),
    (["--repeat-penalty", "0"], "repetition penalty"),
    (["--temperature", "nan"], "temperature"),
    (["--seed", "-1"], "seed"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flags(args, needle, tiny, cache):
    r = run_cli("generate", "-m", tiny, "-p", "hi", "-n", "2", *args, env={"MINIRT_HOME": str(cache)})
    assert_one_line_error(r, needle)


def test_missing_prompt_and_bad_commands(cache):
    env = {"MINIRT_HOME": str(cache)}  # default model smollm2: these must fail before any load or fetch
    assert_one_line_error(run_cli("generate", env=env), "no prompt")
    assert_one_line_error(run_cli("generate", "-p", "hi", "-f", "/nonexistent/p.txt", env=env), "not both")
    assert_one_line_error(run_cli("generate", "-f", "/nonexistent/p.txt", env=env), "cannot read prompt file")
    bare = run_cli(env=env)  # bare `minirt`: the usage and the command list (issue 13), not an error line
    assert bare.returncode == 2 and "usage: minirt" in bare.stderr and "generate" in bare.stderr
    assert "Traceback" not in bare.stderr
    assert_one_line_error(run_cli("nosuchcommand", env=env), "invalid choice")


def test_bad_flag_reported_before_download(cache):
    r = run_cli("generate", "-m", "gpt2", "-p", "hi", "--temperature", "-1", env={"MINIRT_HOME": str(cache)})
    assert_one_line_error(r, "temperature")


# ----------------------------------------------------------------------------------------- perplexity

def test_perplexity_bad_inputs(tiny, tmp_path, cache):
    env = {"MINIRT_HOME": str(cache)}
    assert_one_line_error(run_cli("perplexity", "-f", "/nonexistent/text.txt", env=env), "cannot read")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 100)
    assert_one_line_error(run_cli("perplexity", "-f", binary, env=env), "not UTF-8")
    text = tmp_path / "text.txt"
    text.write_text("hello world " * 50)
    assert_one_line_error(run_cli("perplexity", "-m", tiny, "-f", text, "--ctx", "100000", env=env), "ctx")
    assert_one_line_error(run_cli("perplexity", "-m", tiny, "-f", text, "--ctx", "16", "--chunks", "0", env=env),
                          "chunks")


# --------------------------------------------------------------------------------- SmolLM2 (real model)

def test_smollm2_context_limits(smollm2_path, botchan_text):
    """Prompt longer than the context (CLI --ctx 16, and the API at the model's 8192) and perplexity --ctx 100000.

    The two CLI runs overlap (~5 s for both); the in-process load waits for them, as running it alongside
    makes all three several times slower on a small machine."""
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    procs = [run_cli("generate", "-p", long_prompt, "--ctx", "16", "-n", "4", popen=True),
             run_cli("perplexity", "-f", "botchan", "--ctx", "100000", popen=True)]
    outs = [p.communicate(timeout=60) for p in procs]
    gen_r, ppl_r = (subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outs))
    assert_one_line_error(gen_r, "context holds 16", "--ctx")
    assert_one_line_error(ppl_r, "ctx", "8192", "100000")

    model = minirt.load("smollm2")
    assert model.cfg.max_ctx == 8192
    with pytest.raises(MinirtError, match="context holds 8192"):
        model.generate("word " * 20000, max_tokens=1)


# -------------------------------------------------------------------------------- cache and registry

def test_list_shows_cached_smollm2(smollm2_path):
    r = run_cli("list")  # MINIRT_HOME as the caller has it: the real cache
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "smollm2-135m" in ln)
    assert "present" in line.split()


def test_pull_cached_data_needs_no_network(botchan_text):
    r = run_cli("pull", "botchan")  # network is dead (NO_NET): the cached copy must do
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("botchan.txt")
    assert Path(r.stdout.strip()).is_file()


def test_pull_offline_fails_fast_and_leaves_nothing(cache):
    r = run_cli("pull", "gpt2", env={"MINIRT_HOME": str(cache), "HF_ENDPOINT": DEAD})
    assert_one_line_error(r, "offline")
    assert r.seconds < 10
    assert not (cache / "gpt2").exists()  # and the `cache` fixture checks no file at all (no .part) is left


def test_generate_offline_registry_model(cache):
    r = run_cli("generate", "-m", "gpt2", "-p", "hi", env={"MINIRT_HOME": str(cache), "HF_ENDPOINT": DEAD})
    assert_one_line_error(r, "offline")


def test_modes_run_from_the_cli(tiny, cache):
    """--mode speculative prints the same greedy text as dense plus its statistics; --mode lowrank factors
    the matrices and reports what it did."""
    env = {"MINIRT_HOME": str(cache)}
    base = ["generate", "-m", tiny, "-p", "hello hello hello hello", "-n", "8", "--temperature", "0"]
    dense = run_cli(*base, env=env)
    spec = run_cli(*base, "--mode", "speculative", "--draft", "ngram", "--draft-k", "3", env=env)
    assert dense.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == dense.stdout
    assert "verify calls" in spec.stderr and "acceptance" in spec.stderr
    low = run_cli(*base, "--mode", "lowrank", "--rank", "2", env=env)
    assert low.returncode == 0, low.stderr
    assert "low rank:" in low.stderr and "matrices factored" in low.stderr
