"""Loaders that cannot be crashed: mutated model files of every format, and one named test per failure class.

The fuzz oracle, for each mutated file: a MinirtError (one line); or a load whose logits equal the unmutated
model's; or, where the mutation lies in tensor data or a float setting (epsilon, RoPE base: undetectable
without checksums, which GGUF lacks), finite logits. Anything else fails: another exception (a traceback),
a crash of the process, a hang, a memory blow-up, or different logits after an edit outside tensor data
(a silently wrong load).

Inputs run in a worker process with a memory limit (RLIMIT_AS) and a time limit per input, so a native crash
or a hang fails the test instead of killing pytest. The worker has imported minirt and loaded its kernels
once; it is reused across inputs and replaced when one kills it. (Forking a child per input from a warm
parent does not work here: Numba's thread pools, GNU OpenMP and workqueue alike, refuse or hang in a child
forked after the parent used them.)

Budget: FUZZ_EXAMPLES inputs in the default run (about a minute); `-m slow` runs test_fuzz_long with more.
"""
from __future__ import annotations

import json
import os
import pickle
import select
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minirt
from minirt.convert import convert

from .test_errors_and_fetch import make_tiny_gpt2, safetensors_bytes

ROOT = Path(__file__).resolve().parent.parent
IDS = [1, 5, 9, 2, 7, 3]
FUZZ_EXAMPLES = int(os.environ.get("MINIRT_FUZZ_EXAMPLES", "1000"))
TIME_LIMIT = 20.0         # seconds per input
MEMORY_LIMIT = 1 << 30    # bytes of address space above the warm worker's own

WORKER = r"""
import json, resource, sys, traceback
import numpy as np
import minirt
from minirt import MinirtError
from minirt.readers.llama2c import is_llama2c, read_llama2c
def load(p):
    if p.endswith(".bin") and is_llama2c(p):
        return minirt.Model.from_checkpoint(read_llama2c(p))
    return minirt.load(p)
for p in sys.argv[1:]:
    load(p).logits(IDS)                           # warm: kernels compiled / loaded from the cache
with open('/proc/self/status') as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmSize'))
resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_LIMIT, vm + MEMORY_LIMIT))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    path = json.loads(line)["path"]
    try:
        m = load(path)
        out = m.logits(IDS)
        r = {"outcome": "ok", "logits": out.astype(np.float32).tobytes().hex(), "finite": bool(np.isfinite(out).all())}
    except MinirtError as e:
        r = {"outcome": "error", "message": str(e)}
    except MemoryError:
        r = {"outcome": "blow-up", "message": "MemoryError"}
    except BaseException as e:
        r = {"outcome": "traceback", "message": "".join(traceback.format_exception(e))[-2000:]}
    print(json.dumps(r), flush=True)
""".replace("IDS", repr(IDS)).replace("MEMORY_LIMIT", str(MEMORY_LIMIT))


class Worker:
    """A warm process that loads files one at a time; replaced when an input crashes or hangs it."""

    def __init__(self, warm: list[Path], time_limit: float = TIME_LIMIT):
        self.warm, self.proc, self.time_limit = [str(p) for p in warm], None, time_limit

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, *self.warm], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert json.loads(self._line(300))["ready"]

    def _line(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def run(self, path: Path) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps({"path": str(path)}) + "\n")
            self.proc.stdin.flush()
            line = self._line(self.time_limit)
        except BrokenPipeError:
            line = ""
        if line:
            return json.loads(line)
        if line is None:
            self.close()
            return {"outcome": "hang"}
        rc = self.proc.wait()
        self.proc = None
        return {"outcome": "crash", "message": f"exit status {rc}"}

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# ---------------------------------------------------------------------------------------- tiny models

def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors: 2 layers, width 32, 4 heads sharing 2 KV heads, 64 tokens, untied."""
    V, D, H, KV, F, L = 64, 32, 4, 2, 48, 2
    hd = D // H
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=KV, intermediate_size=F, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False)))
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": 1 + r(D), "lm_head.weight": r(V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + r(D), p + "post_attention_layernorm.weight": 1 + r(D),
                  p + "self_attn.q_proj.weight": r(H * hd, D), p + "self_attn.k_proj.weight": r(KV * hd, D),
                  p + "self_attn.v_proj.weight": r(KV * hd, D), p + "self_attn.o_proj.weight": r(D, H * hd),
                  p + "mlp.gate_proj.weight": r(F, D), p + "mlp.up_proj.weight": r(F, D),
                  p + "mlp.down_proj.weight": r(D, F)})
    (folder / "model.safetensors").write_bytes(safetensors_bytes(t))
    return folder


def write_llama2c_v0(path: Path, seed: int = 0) -> Path:
    """A legacy (v0) llama2.c checkpoint: 7 int32, then float32 arrays in run.c's order (classifier unshared)."""
    D, F, L, H, KV, V, S = 32, 48, 2, 4, 2, 64, 32
    hd = D // H
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    parts = [r(V, D), 1 + r(L, D), r(L, D, D), r(L, KV * hd, D), r(L, KV * hd, D), r(L, D, D), 1 + r(L, D),
             r(L, F, D), r(L, D, F), r(L, F, D), 1 + r(D), r(S, hd // 2), r(S, hd // 2), r(V, D)]
    path.write_bytes(struct.pack("<7i", D, F, L, H, KV, -V, S) + b"".join(p.tobytes() for p in parts))
    return path


def write_torch_bin(st_folder: Path, dest: Path) -> Path | None:
    """The same folder with pytorch_model.bin (torch.save, in a subprocess: torch stays out of this process)."""
    shutil.copytree(st_folder, dest)
    code = ("import sys, torch; from safetensors.torch import load_file; "
            "torch.save(load_file(sys.argv[1]), sys.argv[2])")
    r = subprocess.run([sys.executable, "-c", code, str(dest / "model.safetensors"), str(dest / "pytorch_model.bin")],
                       capture_output=True)
    (dest / "model.safetensors").unlink()
    return dest if r.returncode == 0 else None


# ------------------------------------------------------------------------------------- the formats

class Subject:
    """A valid model in one format; `member` is the file mutations apply to (the path itself for files)."""

    def __init__(self, name: str, path: Path, member: str | None = None):
        self.name, self.path, self.member = name, path, member
        self.file = path / member if member else path
        self.good = self.file.read_bytes()
        self.soft = soft_ranges(self)   # byte ranges where a mutation may change the logits (tensor data, floats)

    def materialise(self, data: bytes, where: Path) -> Path:
        if self.member is None:
            out = where / self.path.name
            out.write_bytes(data)
            return out
        out = where / self.path.name
        shutil.copytree(self.path, out)
        (out / self.member).write_bytes(data)
        return out


OPTIONAL = ("output.weight", "lm_head.weight", "bias")  # renamed away, the model is tied / has no bias:
# the file then describes another valid model plus a stray tensor (one warning line), as llama.cpp reads it


def soft_ranges(s: Subject) -> list[tuple[int, int]]:
    b = s.good
    if s.file.suffix in (".gguf", ".safetensors"):
        names = [n for n in json.loads(b[8:8 + struct.unpack("<Q", b[:8])[0]])] if s.file.suffix == ".safetensors" \
            else [i[0] for i in __import__("minirt.readers.gguf", fromlist=["_parse"])._parse(s.file)[1]]
        # the name where the file stores it (GGUF: after its u64 length; safetensors: a JSON key), not the
        # first occurrence of the text ("output.weight" also ends "blk.0.attn_output.weight")
        gguf_file = s.file.suffix == ".gguf"
        renames = []
        for n in names:
            if n.endswith(OPTIONAL):
                pat = struct.pack("<Q", len(n.encode())) + n.encode() if gguf_file else b'"' + n.encode() + b'"'
                i = b.find(pat)
                if i >= 0:
                    a = i + (8 if gguf_file else 1)
                    renames.append((a, a + len(n.encode())))
    if s.file.suffix == ".gguf":
        from minirt.readers.gguf import _parse
        start = _parse(s.file)[2]
        out = [(start, len(b))] + renames
        for key in (b"layer_norm_rms_epsilon", b"layer_norm_epsilon", b"rope.freq_base"):
            i = b.find(key)
            if i >= 0:  # the key (renamed: the default applies) and its float32 value
                out.append((i, i + len(key) + 8))
        return out
    if s.file.suffix == ".safetensors":
        return [(8 + struct.unpack("<Q", b[:8])[0], len(b))] + renames
    if s.file.name == "config.json":
        out = []
        for key in (b'"rms_norm_eps"', b'"rope_theta"', b'"layer_norm_epsilon"'):
            i = b.find(key)
            if i >= 0:  # the key (renamed: the default applies) and its value
                out.append((i, b.find(b",", i) if b.find(b",", i) > 0 else len(b)))
        return out
    if s.file.suffix == ".bin" and s.name == "llama2c":
        return [(28, len(b))]
    return []   # pytorch_model.bin: storages are CRC-checked by the zip reader


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> dict[str, Subject]:
    root = tmp_path_factory.mktemp("fuzz")
    gpt2 = make_tiny_gpt2(root / "st-gpt2")
    (gpt2 / "merges.txt").write_text("#version: 0.2\nh e\n")  # GGUF holds no empty arrays
    llama = make_tiny_llama(root / "st-llama")
    convert(gpt2, root / "gpt2.gguf", progress=False)
    convert(llama, root / "llama.gguf", progress=False)
    convert(llama, root / "llama-q8.gguf", "Q8_0", progress=False)
    subs = [Subject("gguf-gpt2", root / "gpt2.gguf"), Subject("gguf-llama", root / "llama.gguf"),
            Subject("gguf-q8", root / "llama-q8.gguf"), Subject("st-gpt2", gpt2, "model.safetensors"),
            Subject("st-llama", llama, "model.safetensors"), Subject("config-llama", llama, "config.json"),
            Subject("vocab-gpt2", gpt2, "vocab.json"),
            Subject("llama2c", write_llama2c_v0(root / "llama2c.bin"))]
    binf = write_torch_bin(gpt2, root / "bin-gpt2")
    if binf is not None:
        subs.append(Subject("bin-gpt2", binf, "pytorch_model.bin"))
    return {s.name: s for s in subs}


@pytest.fixture(scope="module")
def references(subjects) -> dict[str, bytes]:
    """Logits of each unmutated subject (llama2c files are read through minirt.convert's reader)."""
    return {name: reference_logits(s) for name, s in subjects.items()}


def load_any(path: Path):
    from minirt.readers.llama2c import is_llama2c, read_llama2c
    if path.is_file() and path.suffix == ".bin" and is_llama2c(path):
        return minirt.Model.from_checkpoint(read_llama2c(path))
    return minirt.load(str(path))


def reference_logits(s: Subject) -> bytes:
    return load_any(s.path).logits(IDS).astype(np.float32).tobytes()


@pytest.fixture(scope="module")
def worker(subjects):
    w = Worker([subjects["gguf-gpt2"].path, subjects["gguf-q8"].path])
    yield w
    w.close()


# ------------------------------------------------------------------------------------- mutations

INTERESTING = [0, 1, 2, 3, 7, 31, 255, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 10 ** 9,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


@st.composite
def mutations(draw, subject: Subject):
    """(kind, mutated bytes, the byte range touched)."""
    b = subject.good
    n = len(b)
    head = min(n, max(64, n - sum(e - a for a, e in subject.soft if e == n)))  # bytes before the data
    kind = draw(st.sampled_from(["truncate", "flip", "flip-header", "field", "field-header", "splice"]))
    if kind == "truncate":
        k = draw(st.integers(0, n - 1))
        return kind, b[:k], (k, n)
    if kind.startswith("flip"):
        pos = draw(st.integers(0, (head if kind == "flip-header" else n) - 1))
        mask = draw(st.integers(1, 255))
        return kind, b[:pos] + bytes([b[pos] ^ mask]) + b[pos + 1:], (pos, pos + 1)
    if kind.startswith("field"):
        width = draw(st.sampled_from([4, 8]))
        pos = draw(st.integers(0, max(0, (head if kind == "field-header" else n) - width)))
        value = draw(st.sampled_from(INTERESTING)) & ((1 << (8 * width)) - 1)
        if draw(st.booleans()):
            value = (-value) & ((1 << (8 * width)) - 1)
        return kind, b[:pos] + value.to_bytes(width, "little") + b[pos + width:], (pos, pos + width)
    a = draw(st.integers(0, n - 1))          # splice: a chunk copied over another place, or removed
    e = draw(st.integers(a, min(n, a + 64)))
    dst = draw(st.integers(0, n - 1))
    return kind, b[:dst] + b[a:e] + b[dst + e - a:], (dst, dst + e - a)


def extreme(blob: bytes, touched: tuple[int, int], start: int) -> bool:
    """Whether the edited bytes read as float32 or float16 values (aligned from the data start) hold a
    magnitude above 1e4: weights no model has, which may overflow to infinite logits without any bug."""
    a, e = touched
    for size, dt in ((4, "<f4"), (2, "<f2")):
        lo = a - (a - start) % size
        vals = np.frombuffer(blob[lo:lo + -(-(e - lo) // size) * size], dt)
        with np.errstate(over="ignore", invalid="ignore"):
            if (np.abs(vals.astype(np.float64)) > 1e4).any():
                return True
    return False


FLOAT_KEYS = ("rms_norm_eps", "rope_theta", "layer_norm_epsilon")


def floats_changed(subject: Subject, blob: bytes) -> bool:
    """config.json still parses but gives other float settings (or drops them: the defaults apply)."""
    if subject.file.name != "config.json":
        return False
    try:
        new, old = json.loads(blob), json.loads(subject.good)
    except ValueError:
        return False
    return isinstance(new, dict) and any(new.get(k) != old.get(k) for k in FLOAT_KEYS)


def judge(subject: Subject, ref: bytes, touched: tuple[int, int], r: dict, blob: bytes = b"") -> str:
    """The outcome's class: 'error', 'same', 'data' (finite logits after a data edit) or a failure class."""
    if r["outcome"] == "error":
        return "error" if "\n" not in r["message"] else "traceback"
    if r["outcome"] != "ok":
        return r["outcome"]
    if bytes.fromhex(r["logits"]) == ref:
        return "same"
    soft = any(a <= touched[0] and touched[1] <= e for a, e in subject.soft) or floats_changed(subject, blob)
    if soft and (r["finite"] or extreme(blob, touched, subject.soft[0][0])):
        return "data"
    return "nonfinite" if soft else "wrong"


FAILURES = {"traceback", "crash", "hang", "blow-up", "wrong", "nonfinite"}


def fuzz(subjects, references, worker, tmp_path_factory, examples: int, derandomize: bool = False):
    counts: dict[str, int] = {}
    failures: list[str] = []
    names = sorted(subjects)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one(data):
        s = subjects[data.draw(st.sampled_from(names))]
        kind, blob, touched = data.draw(mutations(s))
        if blob == s.good:
            return
        where = tmp_path_factory.mktemp("m")
        path = s.materialise(blob, where)
        r = worker.run(path)
        c = judge(s, references[s.name], touched, r, blob)
        counts[c] = counts.get(c, 0) + 1
        if c in FAILURES:
            saved = tmp_path_factory.mktemp("failure") / f"{s.name}-{kind}"  # kept for a look
            shutil.copytree(where, saved)
            failures.append(f"{c}: {s.name} {kind} at {touched} ({saved}): {r.get('message', '')[-300:]}")
        shutil.rmtree(where, ignore_errors=True)

    one()
    print(f"fuzz outcomes over {sum(counts.values())} inputs: {counts}", file=sys.stderr)
    return counts, failures


def test_fuzz_short(subjects, references, worker, tmp_path_factory):
    """The same inputs on every run (a default-suite test must not pass or fail by chance); test_fuzz_long,
    under `slow`, draws new ones each time."""
    counts, failures = fuzz(subjects, references, worker, tmp_path_factory, FUZZ_EXAMPLES, derandomize=True)
    assert not failures, "\n".join(failures[:10])
    assert counts.get("error", 0) > 0 and counts.get("same", 0) + counts.get("data", 0) > 0  # both sides exercised


@pytest.mark.slow
def test_fuzz_long(subjects, references, worker, tmp_path_factory):
    _, failures = fuzz(subjects, references, worker, tmp_path_factory, 10 * FUZZ_EXAMPLES)
    assert not failures, "\n".join(failures[:10])


def test_worker_reports_crash_and_hang(subjects):
    """The harness itself: an input that kills or stalls the worker is reported, and a new worker takes over."""
    import signal
    good = subjects["gguf-gpt2"].path
    w = Worker([good], time_limit=5)
    try:
        w._start()
        os.kill(w.proc.pid, signal.SIGSEGV)
        assert w.run(good)["outcome"] == "crash"
        w._start()
        os.kill(w.proc.pid, signal.SIGSTOP)
        assert w.run(good)["outcome"] == "hang"
        assert w.run(good)["outcome"] == "ok"
    finally:
        w.close()


# ------------------------------------------------------------------------ one test per failure class
# Each bad file goes through the worker too: a regression that crashes or hangs fails the test, not pytest.

def refused(worker, path: Path, *needles: str) -> str:
    r = worker.run(path)
    assert r["outcome"] == "error", r
    msg = r["message"]
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def gguf_with(src: Path, dst: Path, meta: dict | None = None, drop=(), tensors=None) -> Path:
    """A copy of a GGUF with metadata keys set ({key: (value, GGUFValueType)}) or dropped, and tensors
    replaced/added ({name: array}) — written by the gguf package, so placement stays valid."""
    import gguf

    from minirt.quantize import copy_metadata, copy_tensor
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    copy_metadata(r, w, skip=set(meta or {}) | set(drop))
    for k, (v, t) in (meta or {}).items():
        w.add_key_value(k, v, t)
    tensors = dict(tensors or {})
    for t in r.tensors:
        if t.name in tensors:
            a = tensors.pop(t.name)
            if a is not None:
                w.add_tensor(t.name, a)
        else:
            copy_tensor(w, t)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def gguf_layout(b: bytes) -> tuple[dict, list[dict]]:
    """Byte positions of a GGUF's metadata values and tensor-info fields (for byte-level edits)."""
    from minirt.readers.gguf import _Header
    h = _Header(memoryview(b), "x")
    h.take(4 + 4)
    n_t, n_kv = struct.unpack("<QQ", h.take(16))
    keys = {}
    for _ in range(n_kv):
        key = h.string()
        (t,) = struct.unpack("<I", h.take(4))
        keys[key] = (h.pos - 4, h.pos)   # type field, value
        h.value(t)
    infos = []
    for _ in range(n_t):
        name = h.string()
        (nd,) = struct.unpack("<I", h.take(4))
        dims = h.pos
        h.take(8 * nd)
        infos.append(dict(name=name, dims=dims, type=h.pos, offset=h.pos + 4))
        h.take(12)
    return keys, infos


def patched(src: Path, dst: Path, pos: int, data: bytes) -> Path:
    b = bytearray(src.read_bytes())
    b[pos:pos + len(data)] = data
    dst.write_bytes(bytes(b))
    return dst


U32, I32, F32, STR = (4, 5, 6, 8)


@pytest.mark.parametrize("key, value, needle", [
    ("llama.attention.head_count_kv", 1, "the config implies"),        # K/V rows disagree with the config: named tensor
    ("llama.embedding_length", 48, "the config implies"),
    ("llama.feed_forward_length", 40, "the config implies"),
    ("llama.attention.key_length", 16, "the config implies"),
    ("llama.block_count", 10 ** 9, "block_count"),       # looped forever
    ("llama.block_count", 1, "layer 1"),                 # fewer layers than the file: never run fewer
    ("llama.context_length", 1 << 31, "context_length"),  # 16 GiB of RoPE tables
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), "epsilon"),
    ("llama.rope.freq_base", -10000.0, "freq_base"),
])
def test_gguf_config_disagrees(key, value, needle, subjects, worker, tmp_path):
    import gguf
    t = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
    refused(worker, gguf_with(subjects["gguf-llama"].path, tmp_path / "m.gguf", {key: (value, t)}), needle)


def test_gguf_shape_mismatch_names_tensor_and_shapes(subjects, worker, tmp_path):
    """A norm of the wrong width gave NaN logits; now the message names the tensor, expected and found."""
    bad = gguf_with(subjects["gguf-llama"].path, tmp_path / "m.gguf",
                    tensors={"blk.0.attn_norm.weight": np.ones(31, np.float32)})
    refused(worker, bad, "blk.0.attn_norm.weight (layers.0.attn_norm.weight)", "[31]", "[32]")


@pytest.mark.parametrize("align, needle", [(0, "alignment"), (3, "alignment"), ((1 << 32) - 1, "alignment")])
def test_gguf_bad_alignment(align, needle, subjects, worker, tmp_path):
    import gguf
    bad = gguf_with(subjects["gguf-llama"].path, tmp_path / "m.gguf",
                    {"general.alignment": (align, gguf.GGUFValueType.UINT32)})
    refused(worker, bad, needle)


def test_gguf_alignment_not_an_integer(subjects, worker, tmp_path):
    import gguf
    bad = gguf_with(subjects["gguf-llama"].path, tmp_path / "m.gguf",
                    {"general.alignment": (32.0, gguf.GGUFValueType.FLOAT32)})
    refused(worker, bad, "alignment")


@pytest.mark.parametrize("delta, needle", [(32, "offset"), (-32, "offset"), (4, "offset"), (1 << 40, "offset")])
def test_gguf_tensor_offsets_shifted_overlapping_misaligned(delta, needle, subjects, worker, tmp_path):
    src = subjects["gguf-llama"].path
    b = src.read_bytes()
    _, infos = gguf_layout(b)
    ti = infos[len(infos) // 2]
    (off,) = struct.unpack_from("<Q", b, ti["offset"])
    refused(worker, patched(src, tmp_path / "m.gguf", ti["offset"], struct.pack("<Q", max(0, off + delta))), needle)


def test_gguf_dims_wrap_int64(subjects, worker, tmp_path):
    """Dimensions whose product wraps int64 to a small number."""
    src = subjects["gguf-llama"].path
    ti = gguf_layout(src.read_bytes())[1][0]
    refused(worker, patched(src, tmp_path / "m.gguf", ti["dims"], struct.pack("<QQ", 1 << 32, (1 << 32) + 1)), "shape")


def test_gguf_type_relabelled_to_a_larger_block(subjects, worker, tmp_path):
    src = subjects["gguf-llama"].path
    ti = gguf_layout(src.read_bytes())[1][3]
    refused(worker, patched(src, tmp_path / "m.gguf", ti["type"], struct.pack("<I", 8)))  # F32 → Q8_0


def test_gguf_type_code_unknown(subjects, worker, tmp_path):
    src = subjects["gguf-llama"].path
    ti = gguf_layout(src.read_bytes())[1][3]
    refused(worker, patched(src, tmp_path / "m.gguf", ti["type"], struct.pack("<I", 4242)), "type")


def test_gguf_tensor_count_one_short(subjects, worker, tmp_path):
    src = subjects["gguf-llama"].path
    (n,) = struct.unpack_from("<Q", src.read_bytes(), 8)
    refused(worker, patched(src, tmp_path / "m.gguf", 8, struct.pack("<Q", n - 1)))


def test_gguf_arrays_nested_deep(subjects, worker, tmp_path):
    """2,000 arrays deep raised RecursionError."""
    deep = struct.pack("<IQ", 9, 1) * 2000 + struct.pack("<IQ", 4, 0)
    key = b"x.deep"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + deep
    b = subjects["gguf-llama"].path.read_bytes()
    n_kv = struct.unpack_from("<Q", b, 16)[0]
    _, infos = gguf_layout(b)
    first_ti = infos[0]["dims"] - 4 - 8 - len(infos[0]["name"].encode())
    bad = b[:16] + struct.pack("<Q", n_kv + 1) + b[24:first_ti] + kv + b[first_ti:]
    (tmp_path / "m.gguf").write_bytes(bad)
    refused(worker, tmp_path / "m.gguf", "nested")


def test_gguf_array_longer_than_file(subjects, worker, tmp_path):
    src = subjects["gguf-gpt2"].path
    keys, _ = gguf_layout(src.read_bytes())
    pos = keys["tokenizer.ggml.tokens"][1]
    refused(worker, patched(src, tmp_path / "m.gguf", pos + 4, struct.pack("<Q", 1 << 60)), "array")


def test_tensor_name_with_newline(subjects, worker, tmp_path):
    """The error names the tensor; the message stays one line (the CLI escapes control characters)."""
    src = subjects["gguf-llama"].path
    b = src.read_bytes()
    i = b.find(b"blk.0.attn_q.weight")
    bad = b[:i] + b"blk.0.attn\nq.weight" + b[i + len(b"blk.0.attn_q.weight"):]
    (tmp_path / "m.gguf").write_bytes(bad)
    r = worker.run(tmp_path / "m.gguf")
    assert r["outcome"] == "error", r


def test_unused_tensor_is_one_warning_line(subjects, tmp_path, capfd):
    bad = gguf_with(subjects["gguf-llama"].path, tmp_path / "m.gguf",
                    tensors={"token_types.weight": np.ones(4, np.float32)})
    ref = minirt.load(subjects["gguf-llama"].path).logits(IDS)
    capfd.readouterr()
    got = minirt.load(bad).logits(IDS)
    err = capfd.readouterr().err
    np.testing.assert_array_equal(got, ref)
    assert err.count("\n") == 1 and "token_types.weight" in err and "warning" in err


# ---- Hugging Face folders

def folder_with(src: Path, dst: Path, **files) -> Path:
    shutil.copytree(src, dst)
    for name, data in files.items():
        name = name.replace("__", ".")
        (dst / name).write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return dst


@pytest.mark.parametrize("edit, needle", [
    ({"vocab_size": 10 ** 12}, "vocab_size"),
    ({"num_attention_heads": 8}, "the config implies"),                  # shapes disagree with the config
    ({"num_key_value_heads": 3}, "KV heads"),
    ({"num_hidden_layers": 1}, "more layers"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"hidden_size": "32"}, "hidden_size"),
])
def test_hf_config_disagrees(edit, needle, subjects, worker, tmp_path):
    s = subjects["st-llama"]
    cfg = json.loads((s.path / "config.json").read_text()) | edit
    refused(worker, folder_with(s.path, tmp_path / "m", config__json=cfg), needle)


def test_gpt2_n_inner_disagrees(subjects, worker, tmp_path):
    s = subjects["st-gpt2"]
    cfg = json.loads((s.path / "config.json").read_text()) | {"n_inner": 16}
    refused(worker, folder_with(s.path, tmp_path / "m", config__json=cfg), "w_up")


def st_bytes(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize("label", ["gap", "overlap", "negative-shape", "infinity", "float-shape", "trailing"])
def test_safetensors_layout(label, subjects, worker, tmp_path):
    """Edits of the real file's header that the old reader loaded (data shifted) or crashed on."""
    good = subjects["st-gpt2"].good
    n = struct.unpack("<Q", good[:8])[0]
    header, data = json.loads(good[8:8 + n]), good[8 + n:]
    last = max(header, key=lambda k: header[k]["data_offsets"][0])
    two_d = next(k for k, v in header.items() if len(v["shape"]) == 2)
    a, b = header[last]["data_offsets"]
    if label == "gap":            # the last tensor read 4 bytes later
        header[last]["data_offsets"], data = [a + 4, b + 4], data + b"\0" * 4
    elif label == "overlap":      # ... or 4 bytes earlier, over its neighbour
        header[last]["data_offsets"], data = [a - 4, b - 4], data[:-4]
    elif label == "negative-shape":
        header[two_d]["shape"] = [-x for x in header[two_d]["shape"]]
    elif label == "float-shape":
        header[two_d]["shape"] = [float(x) for x in header[two_d]["shape"]]
    elif label == "trailing":
        data += b"\0" * 8
    h = json.dumps(header).encode()
    if label == "infinity":
        h = h.replace(json.dumps(header[two_d]["shape"]).encode(), b"[Infinity, 8]", 1)
    raw = struct.pack("<Q", len(h)) + h + data
    refused(worker, folder_with(subjects["st-gpt2"].path, tmp_path / "m", model__safetensors=raw))


def test_safetensors_json_nested_deep(subjects, worker, tmp_path):
    h = b"[" * 100_000 + b"]" * 100_000
    raw = struct.pack("<Q", len(h)) + h
    refused(worker, folder_with(subjects["st-gpt2"].path, tmp_path / "m", model__safetensors=raw), "nested")


@pytest.mark.parametrize("member", ["config.json", "vocab.json", "tokenizer_config.json"])
def test_invalid_utf8_in_json(member, subjects, worker, tmp_path):
    s = subjects["st-gpt2"]
    src = s.path / member
    data = (src.read_bytes() if src.exists() else b'{"chat_template": "x"}')
    bad = data[:1] + b'"\xff\xfe":1,' + data[1:]
    refused(worker, folder_with(s.path, tmp_path / "m", **{member.replace(".", "__"): bad}), "UTF-8")


@pytest.mark.parametrize("added, needle", [
    ([{"id": 3, "content": ""}], "empty"),
    ([{"id": 3, "content": "<a>"}, {"id": 4, "content": "<a>"}], "twice"),
    ([{"id": 10 ** 6, "content": "<a>"}], "outside"),
    ([{"id": -1, "content": "<a>"}], "outside"),
    ([{"id": "3", "content": "<a>"}], "integer"),
])
def test_tokenizer_json_special_tokens(added, needle, subjects, worker, tmp_path):
    """An empty special token made tiktoken's encoder loop forever; ids must lie inside the embedding."""
    s = subjects["st-gpt2"]
    vocab = json.loads((s.path / "vocab.json").read_text())
    tj = {"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added,
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    folder = folder_with(s.path, tmp_path / "m", tokenizer__json=tj)
    (folder / "vocab.json").unlink()
    refused(worker, folder, needle)


def test_gguf_empty_special_token(subjects, worker, tmp_path):
    import gguf
    r = gguf.GGUFReader(str(subjects["gguf-gpt2"].path))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    tokens[3], types[3] = "", 3
    bad = gguf_with(subjects["gguf-gpt2"].path, tmp_path / "m.gguf",
                    {"tokenizer.ggml.tokens": (tokens, gguf.GGUFValueType.ARRAY),
                     "tokenizer.ggml.token_type": (types, gguf.GGUFValueType.ARRAY)})
    refused(worker, bad, "empty")


# ---- pytorch_model.bin

def bin_folder(subjects, tmp_path, pkl: bytes, storages: dict[str, bytes] | None = None,
               method=zipfile.ZIP_STORED) -> Path:
    folder = folder_with(subjects["st-gpt2"].path, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with zipfile.ZipFile(folder / "pytorch_model.bin", "w", method) as z:
        z.writestr("archive/data.pkl", pkl)
        for k, v in (storages or {}).items():
            z.writestr(f"archive/data/{k}", v)
    return folder


def test_pickle_memo_bomb(subjects, worker, tmp_path):
    """A 9-byte pickle whose memo index asked for 64 GiB."""
    pkl = b"\x80\x02N" + b"r" + struct.pack("<I", 0xFFFFFFF0) + b"."
    refused(worker, bin_folder(subjects, tmp_path, pkl), "not a state dict")


def test_pickle_build_refused(subjects, worker, tmp_path):
    """BUILD on anything but a state dict's _metadata is refused (no attribute of a rebuilt object is settable)."""
    pkl = (b"\x80\x02ccollections\nOrderedDict\n)R}X\x04\x00\x00\x00evilK\x01sb.")
    refused(worker, bin_folder(subjects, tmp_path, pkl), "BUILD")


def test_pickle_build_metadata_allowed(subjects, worker, tmp_path):
    """torch.save's own use of BUILD (the state dict's _metadata) still loads."""
    if "bin-gpt2" not in subjects:
        pytest.skip("torch not available to write the file")
    data = zipfile.ZipFile(subjects["bin-gpt2"].file).read(
        next(n for n in zipfile.ZipFile(subjects["bin-gpt2"].file).namelist() if n.endswith("data.pkl")))
    assert pickle.BUILD in data  # the file torch wrote uses it
    assert worker.run(subjects["bin-gpt2"].path)["outcome"] == "ok"


def _rebuild_pickle(size, stride, numel) -> bytes:
    """{"wte.weight": _rebuild_tensor_v2(FloatStorage key 0, offset 0, size, stride)} as torch pickles it."""
    out = b"\x80\x02}X\x0a\x00\x00\x00wte.weightctorch._utils\n_rebuild_tensor_v2\n("
    out += b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
    out += b"J" + struct.pack("<i", numel) + b"tQ"
    out += b"K\x00" + pickle.dumps(tuple(size), 2)[2:-1] + pickle.dumps(tuple(stride), 2)[2:-1] + b"\x89"
    out += b"ccollections\nOrderedDict\n)RtRs."
    return out


def test_stride0_view_expanded(subjects, worker, tmp_path):
    """A stride-0 view of a one-element storage, sized to 4 TiB."""
    pkl = _rebuild_pickle((1 << 20, 1 << 20), (0, 0), 1)
    refused(worker, bin_folder(subjects, tmp_path, pkl, {"0": b"\0" * 4}), "outside its storage")


def test_zip_bomb_member(subjects, worker, tmp_path):
    """A small deflated member that declares gigabytes."""
    pkl = _rebuild_pickle((4,), (1,), 1 << 28)
    folder = bin_folder(subjects, tmp_path, pkl, {"0": b"\0" * (1 << 22)}, zipfile.ZIP_DEFLATED)
    raw = bytearray((folder / "pytorch_model.bin").read_bytes())
    # declare 1 GiB for the storage in both the local and the central headers
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        start = 0
        while (i := raw.find(sig, start)) >= 0:
            name_len_at = i + (26 if sig == b"PK\x03\x04" else 28)
            (nlen,) = struct.unpack_from("<H", raw, name_len_at)
            name = raw[name_len_at + (4 if sig == b"PK\x03\x04" else 18):][:nlen]
            if name.endswith(b"data/0"):
                struct.pack_into("<I", raw, i + (22 if sig == b"PK\x03\x04" else 24), 1 << 30)
            start = i + 4
    (folder / "pytorch_model.bin").write_bytes(bytes(raw))
    refused(worker, folder)


# ---- llama2.c

def test_llama2c_header_sizes(subjects, worker, tmp_path):
    src = subjects["llama2c"].path
    for i, (field, value) in enumerate([("layers", 10 ** 6), ("seq", 1 << 30), ("vocab", -(1 << 30)), ("dim", 48)]):
        pos = {"dim": 0, "layers": 8, "vocab": 20, "seq": 24}[field]
        refused(worker, patched(src, tmp_path / f"m{i}.bin", pos, struct.pack("<i", value)))


def test_show_describes_a_file_and_refuses_a_bad_one(subjects, tmp_path):
    """minirt show: what the file holds, read and validated without building a model; a bad file is one line."""
    r = subprocess.run([sys.executable, "-m", "minirt", "show", str(subjects["gguf-q8"].path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = dict(line.strip().split("  ", 1) for line in r.stdout.splitlines())
    assert out["architecture"].strip() == "llama" and out["layers"].strip() == "2" and out["vocabulary"].strip() == "64"
    assert out["heads"].strip().startswith("4 (kv 2") and "Q8_0" in out["tensors"] and out["file type"].strip() == "Q8_0"
    bad = patched(subjects["gguf-q8"].path, tmp_path / "bad.gguf", 8, struct.pack("<Q", 1 << 40))
    r = subprocess.run([sys.executable, "-m", "minirt", "show", str(bad)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "corrupt GGUF header" in r.stderr, r.stderr
