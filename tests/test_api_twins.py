"""README's command lines and their Python twins ("The command line in Python") print the same.

The pairs are read from README.md, so the README cannot drift from what is tested. Each pair runs in its own
folder (the CLI through minirt.cli.main, the twin with exec), both with the same small limits patched into
the library: at most N_TOKENS new tokens and seed 0 where none is given (so sampled examples compare), one
perplexity window of the text's start, a bench of a few tokens. Files the pair writes are compared byte for
byte. Pairs that factor or re-encode SmolLM2 (minutes on 2 cores) carry the slow marker.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import numba
import pytest

import minirt
from minirt import bench, generate, perplexity
from minirt.cli import main

README = Path(__file__).parent.parent / "README.md"
N_TOKENS = 6
SLOW = ("lowrank", "svd", "quantize")  # factoring SmolLM2 on the fly: minutes; re-encoding it: ~20 s


def twins() -> tuple[str, list[tuple[str, str]]]:
    """(the block's imports, [(command line, Python code)]) from README's twin section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### The command line in Python"):]
    block = section[section.index("```python\n") + 10:]
    block = block[:block.index("```")]
    head, *pairs = re.split(r"^# (?=minirt )", block, flags=re.M)
    out = []
    for p in pairs:
        cmd, _, code = p.partition("\n")
        out.append((cmd.strip(), code.strip() + "\n"))
    return head, out


HEAD, TWINS = twins()


def _param(cmd: str, code: str):
    slow = any(w in cmd for w in SLOW)
    return pytest.param(cmd, code, id=cmd[len("minirt "):], marks=[pytest.mark.slow] if slow else [])


@pytest.fixture
def small(monkeypatch):
    """The same small limits for both sides of a pair."""
    init = generate.Generation.__init__

    def capped(self, model, prompt, max_tokens=128, **kw):
        kw["seed"] = 0 if kw.get("seed") is None else kw["seed"]
        init(self, model, prompt, min(max_tokens, N_TOKENS), **kw)
    monkeypatch.setattr(generate.Generation, "__init__", capped)
    ppl = perplexity.perplexity
    monkeypatch.setattr(perplexity, "perplexity", lambda model, text, ctx=512, chunks=None, **kw:
                        ppl(model, text[:8000], ctx, 1, **kw))
    run = bench.run
    monkeypatch.setattr(bench, "run", lambda model, p=128, n=128, r=5, **kw: run(model, 8, 4, 1, bandwidth=False))
    threads = numba.get_num_threads()
    yield
    minirt.set_threads(threads)  # -t 1 / threads=1 would stay for the rest of the session


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random Llama as a Hugging Face folder (what ./hf-folder stands for)."""
    from minirt.convert import convert

    from .test_parity import make_llama, write_llama_gguf
    root = tmp_path_factory.mktemp("twins")
    write_llama_gguf(root / "tiny.gguf", make_llama(tied=True))
    return convert(root / "tiny.gguf", root / "hf-folder", progress=False)


def _folder(root: Path, name: str, smollm2_path, tiny_hf) -> Path:
    """A working folder holding what the examples name: notes.txt, ./hf-folder, ./my-model.gguf."""
    d = root / name
    d.mkdir()
    (d / "notes.txt").write_text(README.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    (d / "hf-folder").symlink_to(tiny_hf, target_is_directory=True)
    (d / "my-model.gguf").symlink_to(smollm2_path)
    return d


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and not p.is_symlink() and "hf-folder" not in p.parts and p.name != "notes.txt"}


def _normal(cmd: str, out: str) -> str:
    if cmd.startswith("minirt bench"):  # timings differ from run to run: compare the table's shape
        return re.sub(r" +", " ", re.sub(r"\d+(\.\d+)?", "#", out))  # and the padding that follows the digits
    if cmd == "minirt list" and out.startswith("cache:"):  # the CLI: kind, name (aliases), presence, description
        return "".join(f"{ln.split()[1]} {next(w for w in ln.split() if w in ('present', '-'))}\n"
                       for ln in out.splitlines()[1:])
    return out


@pytest.mark.parametrize("cmd,code", [_param(c, k) for c, k in TWINS])
def test_cli_and_api_twin_print_the_same(cmd, code, small, tmp_path, smollm2_path, tiny_hf, capsys):
    cli_dir = _folder(tmp_path, "cli", smollm2_path, tiny_hf)
    api_dir = _folder(tmp_path, "api", smollm2_path, tiny_hf)
    cwd = os.getcwd()
    try:
        os.chdir(cli_dir)
        assert main(shlex.split(cmd)[1:]) == 0, capsys.readouterr().err
        cli_out = capsys.readouterr().out
        os.chdir(api_dir)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(HEAD + code, f"README twin of {cmd}", "exec"), {})
        api_out = buf.getvalue()
    finally:
        os.chdir(cwd)
    assert cli_out.strip(), "the example printed nothing"
    assert _normal(cmd, api_out) == _normal(cmd, cli_out)
    assert _files(api_dir) == _files(cli_dir)


def test_every_offline_example_has_a_twin():
    """Each command line of README's list has a twin, unless it needs the network, a GPU or a terminal."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index("## Command line"):]
    block = block[block.index("```bash\n") + 8:block.index("```\n", block.index("```bash\n") + 8)]
    listed = [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.startswith("minirt ")]
    # network, GPU or terminal; `minirt rm` deletes the cached model (tested on a temporary cache in test_first_run)
    exempt = ("--device cuda", "minirt pull gpt2", "--model gpt2", "minirt chat", "minirt rm")
    twinned = [c for c, _ in TWINS]
    missing = [c for c in listed if not any(e in c for e in exempt)
               and not any(c in t or t.startswith(c) for t in twinned)]
    assert len(listed) > 15 and not missing, missing
