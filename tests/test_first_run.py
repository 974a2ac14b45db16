"""A first run that works (issue 13): the chat as a terminal user drives it, the chat API's KV reuse against a
fresh run, running from a clone without installing, no build artefacts inside the package, the CLI basics."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pexpect
import pytest

import minirt
from minirt.chat import Chat, render
from minirt.cli import _unescape

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------- the chat API

def test_chat_reuses_the_cache_and_answers_as_a_fresh_run(smollm2):
    """Turn 3 with the KV cache of turns 1–2 reused gives the tokens a fresh run on the whole rendered
    conversation gives (greedy, float32 activations), and prefills only the new part."""
    chat = Chat(smollm2, temperature=0, max_tokens=12)
    for q in ("Name a colour.", "Name a fruit."):
        "".join(chat.send(q))
    reply = "".join(chat.send("Name an animal."))
    st = chat.last.stats
    assert st.cached_tokens > 0.7 * st.prompt_tokens, (st.cached_tokens, st.prompt_tokens)
    full = render(smollm2.tokenizer, chat.messages[:-1])  # the conversation up to the last user message
    fresh = smollm2.generate(full, temperature=0, max_tokens=12)
    assert fresh.text() == reply
    assert fresh.stats.tokens == st.tokens


def test_chat_drops_the_oldest_turns_when_the_context_fills(smollm2):
    chat = Chat(smollm2, system="Answer in one word.", ctx=120, temperature=0, max_tokens=8)
    for i in range(6):
        "".join(chat.send(f"Question number {i}: what is {i} plus {i}?"))
    assert chat.notices, "no notice that turns were dropped"
    assert chat.messages[0] == {"role": "system", "content": "Answer in one word."}
    assert chat.messages[-2]["content"].startswith("Question number 5")
    assert not any("number 0" in m["content"] for m in chat.messages)
    assert chat.cache.pos <= 120


def test_chat_messages_in_text_out(smollm2):
    chat = Chat(smollm2, temperature=0, max_tokens=10)
    msgs = [{"role": "user", "content": "Hello!"}]
    a = chat(msgs)
    b = smollm2.generate("Hello!", chat=True, temperature=0, max_tokens=10).text()
    assert a == b
    with pytest.raises(minirt.MinirtError):
        chat([{"role": "assistant", "content": "hi"}])


# ------------------------------------------------------------------------------- the chat in a terminal

def _spawn_chat(*args):
    env = {**os.environ, "MINIRT_DEBUG": "0"}
    child = pexpect.spawn(sys.executable, ["-m", "minirt", "chat", "--temperature", "0", "--verbose", *args],
                          cwd=str(REPO), env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.expect_exact(">>> ")
    return child


def _turn(child, text: str) -> tuple[float, int, int]:
    """Send a message; return (seconds until the reply's first character shows, prompt tokens, reused)."""
    t0 = time.monotonic()
    child.sendline(text)
    child.expect_exact(text)  # the terminal's echo of the typed line
    child.expect(r"\S")       # the reply's first visible character
    ttft = time.monotonic() - t0
    child.expect(r"prompt: (\d+) tokens(?: \((\d+) reused\))?")
    prompt, reused = int(child.match.group(1)), int(child.match.group(2) or 0)
    child.expect_exact(">>> ")
    return ttft, prompt, reused


def test_chat_in_a_terminal():
    """Two turns answered, the KV cache reused (turn 5's first token at most 2× turn 1's), /clear empties the
    history, Ctrl-C during a reply returns to the prompt with the chat alive, /bye exits 0."""
    child = _spawn_chat("-n", "24")
    try:
        turns = [_turn(child, q) for q in ("What is the capital of France?", "And of Italy?", "And of Spain?",
                                           "And of Germany?", "And of Portugal?")]
        (t1, p1, r1), (t5, p5, r5) = turns[0], turns[4]
        assert r1 == 0 and p5 > 2 * p1 and r5 > 0.8 * p5, turns
        assert t5 <= 2 * t1, f"turn 5 first token {t5:.2f} s vs turn 1 {t1:.2f} s"
        child.sendline("/clear")
        child.expect_exact("(conversation cleared)")
        child.expect_exact(">>> ")
        _, p_after, _ = _turn(child, "Hello!")
        assert p_after < p1 + 10, "the history was not emptied"
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)


def test_chat_ctrl_c_stops_the_reply_not_the_chat():
    child = _spawn_chat("-n", "400")
    try:
        story = "Write a long story about a dragon who learns to fly."
        child.sendline(story)
        child.expect_exact(story)
        child.expect(r"\S{3}")  # the reply is under way
        child.sendintr()
        child.expect_exact("(reply stopped)")
        child.expect_exact(">>> ")
        child.sendline("/clear")  # the chat is alive
        child.expect_exact("(conversation cleared)")
        child.expect_exact(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)


def test_chat_ctrl_d_leaves_and_commands_are_not_sent():
    child = _spawn_chat("-n", "4")
    try:
        child.sendline("/help")
        child.expect_exact("/bye")
        child.expect_exact(">>> ")
        child.sendline("/nosuch")
        child.expect_exact("unknown command")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_multiline_input_from_a_pipe(smollm2_path):
    text = '"""Line one\nline two"""\n/bye\nnever sent\n'
    r = subprocess.run([sys.executable, "-m", "minirt", "chat", "-m", str(smollm2_path), "--temperature", "0",
                        "-n", "4"], input=text, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("prompt: ") == 1  # one message (two lines), then /bye: nothing after it is sent


# ------------------------------------------------------------------------------------------ set-up

def test_runs_from_a_clone_without_installing(tmp_path, smollm2_path):
    """A script in a clone's root imports the clone's minirt (not an installed one) and generates."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "minirt", clone / "minirt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "weights", clone / "weights", ignore=shutil.ignore_patterns("__pycache__"))
    script = ("import minirt, minirt.registry as r\n"
              "assert minirt.__file__.startswith(%r), minirt.__file__\n"
              "assert 'smollm2-135m' in r.REGISTRY\n"
              "m = minirt.load(%r)\n"
              "print(''.join(m.generate('The capital of France is', max_tokens=3, temperature=0)))\n"
              % (str(clone), str(smollm2_path)))
    (clone / "script.py").write_text(script)
    r = subprocess.run([sys.executable, "script.py"], cwd=clone, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    # nothing compiled was written inside the package: kernels live in the user cache
    assert not [p for p in (clone / "minirt").rglob("*") if p.suffix in (".nbi", ".nbc")]


def test_kernels_are_cached_outside_the_package():
    from minirt.jitcache import kernel_dir
    assert list(kernel_dir().rglob("kernels.*.nbi")), "no compiled kernel in the user cache"
    assert not list((REPO / "minirt").rglob("*.nbi"))


# -------------------------------------------------------------------------------------------- CLI

def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "minirt", *map(str, args)], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, **kw)


def test_version_and_help_groups():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"minirt {minirt.__version__}"
    h = _cli("generate", "--help").stdout
    for group in ("prompt:", "model:", "sampling:", "output:", "modes", "performance:"):
        assert group in h
    assert h.index("\nprompt:") < h.index("\nmodes (")
    assert "(default: 0.8)" in h and "(default: 128)" in h


def test_stop_escapes():
    assert _unescape(r"\n") == "\n" and _unescape(r"a\tb") == "a\tb" and _unescape("é\\\\") == "é\\"
    assert _unescape("plain é") == "plain é" and _unescape(r"\q") == r"\q"


def test_stop_newline_from_the_command_line(smollm2_path):
    r = _cli("generate", "-m", smollm2_path, "-p", "1. Apples\n2. Pears\n3.", "--temperature", "0", "-n", "24",
             "--stop", r"\n")
    assert r.returncode == 0, r.stderr
    assert "\n" not in r.stdout.rstrip("\n") and "stop: stop string" in r.stderr


def test_internal_error_is_one_line(tmp_path):
    """An exception that is not a MinirtError (a bug) prints one line, the traceback only with --debug."""
    bad = tmp_path / "x.gguf"
    code = ("import sys, minirt.cli as c\n"
            "def boom(args): raise ZeroDivisionError('boom\\x1b[31m')\n"
            "c.COMMANDS['list'] = boom\n"
            "sys.exit(c.main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "list"], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 70 and len(lines) == 1 and "internal error" in lines[0] and "\x1b" not in lines[0]
    r = subprocess.run([sys.executable, "-c", code, "--debug", "list"], capture_output=True, text=True, timeout=60)
    assert "Traceback" in r.stderr
    del bad


def test_timings_apart_from_compile(smollm2_path, tmp_path):
    r = _cli("generate", "-m", smollm2_path, "-p", "Hello " * 20, "--temperature", "0", "-n", "4",
             env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "kernels")})  # a first run: compiles everything
    assert r.returncode == 0, r.stderr
    m = re.search(r"load: [\d.]+ s · warm-up: ([\d.]+) s", r.stderr)
    assert m and float(m.group(1)) > 3, r.stderr  # the compile is counted here …
    warm = float(m.group(1))
    m = re.search(r"prompt: \d+ tokens, [\d.]+ tok/s, first token after ([\d.]+) s", r.stderr)
    assert m and float(m.group(1)) < warm / 4, r.stderr  # … not as prompt time (a first run said 0.4 tok/s)


def test_rm_and_list_sizes(tmp_path):
    home = tmp_path / "home"
    (home / "botchan").mkdir(parents=True)
    (home / "botchan" / "botchan.txt").write_bytes(b"x" * 1_500_000)
    (home / "botchan" / "botchan_en_bpe_1000.model").write_bytes(b"x" * 500_000)
    env = {**os.environ, "MINIRT_HOME": str(home)}
    r = _cli("list", env=env)
    assert re.search(r"botchan\s+present\s+2\.0 MB", r.stdout), r.stdout
    r = _cli("rm", "botchan", env=env)
    assert r.returncode == 0 and "2.0 MB" in r.stdout and not (home / "botchan").exists()
    r = _cli("rm", "botchan", env=env)
    assert r.returncode == 1 and "not in the cache" in r.stderr
    r = _cli("pull", "nosuch", env=env)
    assert r.returncode == 1 and "minirt list" in r.stderr and "data are" in r.stderr


def test_bench_bandwidth_probe_is_small():
    from minirt.bench import memory_bandwidth
    import inspect
    assert inspect.signature(memory_bandwidth).parameters["gib"].default <= 0.25
    assert np.isfinite(memory_bandwidth(gib=0.01, repeats=1))


def test_every_subpackage_is_installed():
    """`pip install .` ships only the packages pyproject.toml lists: a new folder of minirt must be among them."""
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("minirt",) + p.parent.relative_to(REPO / "minirt").parts)
             for p in (REPO / "minirt").rglob("__init__.py")}
    assert found <= listed, f"not in pyproject.toml's packages: {sorted(found - listed)}"
