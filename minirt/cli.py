"""Command line: a thin layer over the Python API. Text to stdout; progress, timings and errors to stderr."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import MinirtError
from .modes import MODES
from .quantize import TYPES as QUANT_TYPES


class _Help(argparse.HelpFormatter):
    """Shows each option's default, where it has a meaningful one and the help does not name it already."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "(default" in h or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _Help)
        super().__init__(*a, **kw)

    def error(self, message):  # one line, exit 2, instead of usage + message
        raise MinirtError(f"{message} (see: {self.prog} --help)")


def _model_args(p: argparse.ArgumentParser, kv_type: str = "f32") -> None:
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=os.environ.get("MINIRT_MODEL", "smollm2"),
                   help="registry name (see `minirt list`) or a path to a .gguf file / Hugging Face folder")
    g.add_argument("--cache-dir", default=None, help="where models are cached (default: ~/.cache/minirt or $MINIRT_HOME)")
    g.add_argument("--dequantize", action="store_true",
                   help="expand quantized matrices to float32 instead of running on the stored format")
    g.add_argument("--exact", action="store_true",
                   help="float32 activations in the quantized decode kernels (no int8 rounding; slower)")
    g = p.add_argument_group("performance")
    g.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--device", default="cpu", help="cpu, cuda (the GPU backend: CuPy, block-format weights as "
                   "stored on the device) or auto (cuda when CuPy finds a GPU)")
    g.add_argument("-ctk", "--kv-type", choices=("f32", "f16"), default=kv_type,
                   help="KV cache type (CPU): f16 halves its memory and what attention reads, each key and value "
                        "rounded to float16 (llama.cpp's -ctk/-ctv default); f32 is exact (default: %(default)s)")


def _mode_args(p: argparse.ArgumentParser, modes=MODES, bench: bool = False) -> None:
    g = p.add_argument_group("modes (research: low rank, speculative decoding, the pinv transition)")
    g.add_argument("--mode", choices=modes, default="dense", help="how to decode")
    if "speculative" in modes:
        g.add_argument("--draft", default="ngram",
                       help="drafter for --mode speculative: ngram[:N] (prompt lookup), layers:N (early exit), "
                            "lowrank[:E|:pP] (low-rank twin), or a model name/path with the same tokenizer")
        g.add_argument("--draft-k", type=int, default=4, help="draft length K (adapted as acceptance varies)")
    if "jacobi" in modes:
        g.add_argument("--block", type=int, default=4, help="--mode jacobi: positions refined together (1-7)")
    g.add_argument("--pinv-window", type=int, default=16,
                   help="--mode pinv/jacobi: exactly computed FFN rows kept per layer to predict from (S)")
    g.add_argument("--pinv-tol", type=float, default=0.1,
                   help="--mode pinv/jacobi: a row is predicted when its relative residual is at most this (0: never)")
    g.add_argument("--energy", type=float, default=None,
                   help="--mode lowrank: keep this fraction of each matrix's singular-value energy (default 0.9)")
    g.add_argument("--rank", type=int, default=None, help="--mode lowrank: keep this rank instead")
    _factor_args(g)


def _factor_args(p) -> None:
    """How low-rank factors are made (--mode lowrank on the fly, and minirt svd)."""
    p.add_argument("--params", type=float, default=None,
                   help="low rank: keep this fraction of each matrix's parameters instead")
    p.add_argument("--calibration", default=None,
                   help="low rank: activation-aware factors (SVD-LLM) from this text file's activations")
    p.add_argument("--calib-tokens", type=int, default=4096, help="low rank: tokens of the calibration text used")
    p.add_argument("--factor-type", default="F32", choices=("F32", "F16", "Q8_0"),
                   help="low rank: how the factors are stored (Q8_0 rounds ranks up to multiples of 32)")
    p.add_argument("--lowrank-head", action="store_true", help="low rank: factor the output head too")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", "--temp", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus: keep the smallest set with this mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.05, help="drop tokens below this × the top probability (0 = off)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="penalise tokens already seen (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one each run)")
    g = p.add_argument_group("output")
    g.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate at most")
    g.add_argument("--stop", action="append", default=[],
                   help="stop string, repeatable; escapes such as \\n and \\t are understood")
    g.add_argument("--ctx", type=int, default=None, help="context size in tokens (default: 4096 or the model's maximum "
                   "if smaller; at most the model's maximum)")


def build_parser() -> Parser:
    from . import __version__
    ap = Parser(prog="minirt", description="A minimal LLM runtime on numpy and Numba.",
                epilog="Run `minirt COMMAND --help` for a command's options. Set MINIRT_DEBUG=1 (or --debug) for "
                       "tracebacks of internal errors.")
    ap.add_argument("--version", action="version", version=f"minirt {__version__}")
    ap.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    sub = ap.add_subparsers(dest="cmd", parser_class=Parser, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a prompt")
    pr = g.add_argument_group("prompt")
    pr.add_argument("-p", "--prompt", default=None, help="prompt text ('-' reads standard input)")
    pr.add_argument("-f", "--prompt-file", default=None, help="read the prompt from this file")
    pr.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    pr.add_argument("--system", default=None, help="system message for --chat")
    _model_args(g)
    _sampling_args(g)
    _mode_args(g)

    c = sub.add_parser("chat", help="interactive chat with an instruct model (/help inside for commands)")
    c.add_argument("--system", "-s", default=None, help="system message (default: the template's own)")
    c.add_argument("--verbose", action="store_true", help="timings after each reply (always shown when input is "
                   "not a terminal)")
    _model_args(c)
    _sampling_args(c)
    _mode_args(c)

    pp = sub.add_parser("perplexity", help="perplexity of a text file (llama-perplexity's method)")
    pp.add_argument("-f", "--file", required=True, help="text file, or a registry data name such as botchan")
    pp.add_argument("-c", "--ctx", type=int, default=512, help="window size in tokens")
    pp.add_argument("--chunks", type=int, default=None, help="score only the first N windows")
    _model_args(pp)
    _mode_args(pp, ("dense", "lowrank", "pinv"))

    b = sub.add_parser("bench", help="prompt (pp) and generation (tg) speed, like llama-bench")
    b.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens (pp test)")
    b.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (tg test)")
    b.add_argument("-d", "--depth", type=int, default=0,
                   help="tokens already in the context before each test, as llama-bench's -d")
    b.add_argument("-r", "--repetitions", type=int, default=5, help="runs of each test")
    b.add_argument("--prompts", choices=("free", "grounded"), default="free",
                   help="speculative: free writing, or rewriting/summarising passages of botchan.txt")
    b.add_argument("--cost-table", action="store_true",
                   help="ms per forward call of T = 1, 2, 4, 6, 8, 16 positions and × one step (draft verification)")
    _model_args(b)
    _mode_args(b)

    q = sub.add_parser("quantize", help="re-encode a GGUF file's matrices (floats, Q4_0 … Q8_0, K-quants, _M mixes)")
    q.add_argument("model", help="registry name or GGUF path")
    q.add_argument("out", help="output .gguf path")
    q.add_argument("--type", required=True, choices=QUANT_TYPES,
                   help="type of the weight matrices (all of them; _M: llama-quantize's per-tensor mix)")
    q.add_argument("--cache-dir", default=None, help="where models are cached")

    cv = sub.add_parser("convert", help="convert weights (HF folder, GGUF, llama2.c, low-rank export → GGUF or HF)")
    cv.add_argument("src", help="Hugging Face folder, .gguf file, llama2.c checkpoint, or low-rank export folder")
    cv.add_argument("dst", help="output: a .gguf file, or else a folder (written as a Hugging Face model)")
    cv.add_argument("--type", default=None, choices=("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"),
                    help="type of the weight matrices (default: as stored; a HF folder holds F32/F16/BF16)")
    cv.add_argument("--tokenizer", default=None, help="llama2.c tokenizer.bin (default: the one beside SRC)")

    sv = sub.add_parser("svd", help="export a low-rank model (SVD factors) to a folder that --model loads")
    sv.add_argument("model", help="registry name or GGUF path")
    sv.add_argument("--energy", type=float, default=None, help="keep this fraction of the singular-value energy")
    sv.add_argument("--rank", type=int, default=None, help="keep this rank")
    _factor_args(sv)
    sv.add_argument("-o", "--out", default=None, help="output folder (default: the cache, NAME-lowrank-…)")
    sv.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    sv.add_argument("--cache-dir", default=None, help="where models are cached")

    pl = sub.add_parser("pull", help="fetch models or data into the cache ahead of time")
    pl.add_argument("names", nargs="+", help="registry names (see minirt list)")
    pl.add_argument("--cache-dir", default=None, help="where models are cached")

    rm = sub.add_parser("rm", help="delete cached models or data")
    rm.add_argument("names", nargs="+", help="registry names or low-rank export folders in the cache")
    rm.add_argument("--cache-dir", default=None, help="where models are cached")

    sh = sub.add_parser("show", help="describe a model file before trusting it (architecture, sizes, tensor "
                        "types, tokenizer, template), like ollama show")
    sh.add_argument("model", help="registry name or a path to a .gguf file / Hugging Face folder")
    sh.add_argument("--cache-dir", default=None, help="where models are cached")

    se = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching (minirt[serve])")
    se.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    se.add_argument("--port", type=int, default=8080, help="port to listen on")
    se.add_argument("--ctx", type=int, default=None, help="context of each slot in tokens (default: 4096 or the "
                    "model's maximum if smaller)")
    se.add_argument("-np", "--parallel", type=int, default=4, help="slots: requests decoded together")
    se.add_argument("--queue", type=int, default=64, help="requests waiting for a slot at most (beyond: 503)")
    se.add_argument("--api-key", default=os.environ.get("MINIRT_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $MINIRT_API_KEY)")
    se.add_argument("--name", default=None, help="model id reported by /v1/models (default: --model)")
    _model_args(se, kv_type="f16")  # llama-server's default: a server's slots are its memory, and 8 streams'
    # attention reads 8 caches (half the bytes: -0.6 ms of an 8-row step; perplexity +0.04%)

    ls = sub.add_parser("list", help="known models and data, whether they are cached, and their size")
    ls.add_argument("--cache-dir", default=None, help="where models are cached")
    return ap


def _mode_options(args, mode: str | None = None) -> dict:
    """The options of the mode (default: args.mode), as minirt.load takes them, from the flags that differ
    from their defaults."""
    from pathlib import Path

    from .modes import OPTIONS
    attr = dict(window="pinv_window", tol="pinv_tol")  # option → flag where they differ
    out = {}
    for name, default in OPTIONS[mode or args.mode].items():
        value = getattr(args, attr.get(name, name), default)
        if value != default:
            out[name] = Path(value) if name == "calibration" else value
    return out


def _load(args, **override):
    """The model of --model with its --mode composed on, on --device (minirt.load checks every option first)."""
    import minirt
    options = {**_mode_options(args), **override}
    model = minirt.load(args.model, cache_dir=args.cache_dir, threads=args.threads, dequantize=args.dequantize,
                        exact=args.exact, device=args.device, kv_type=args.kv_type, mode=args.mode, **options)
    if args.mode == "lowrank":
        from .modes.lowrank import summary
        print(summary(model), file=sys.stderr)
    return model


def _factor_choice(args):
    return args.energy, args.rank, getattr(args, "params", None)


def _sampling(args) -> dict:
    """generate()'s sampling options; the mode and its options are the model's (minirt.load composed them)."""
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed,
                stop=[_unescape(s) for s in args.stop], ctx=args.ctx)


def _check_args(args) -> None:
    """Reject bad sampling flags before a model is loaded (or downloaded); minirt.load checks the mode's."""
    from .sampling import SamplingParams
    SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.repeat_penalty, args.seed)
    if args.max_tokens < 0:
        raise MinirtError(f"max tokens (--max-tokens) must be ≥ 0, got {args.max_tokens}")
    if args.ctx is not None and args.ctx < 2:
        raise MinirtError(f"--ctx must be ≥ 2, got {args.ctx}")
    if args.mode == "jacobi" and args.temperature != 0:
        raise MinirtError("--mode jacobi decodes greedily: add --temperature 0")


def _load_timed(args):
    """_load, timed: (model, seconds)."""
    import time
    t0 = time.perf_counter()
    model = _load(args)
    return model, time.perf_counter() - t0


def _warm_up(model, load_seconds: float) -> None:
    """A warm-up run, then the load and warm-up times on stderr, so that prompt and decode speeds are the
    model's own. Called once the request is checked, so that a bad request stays a one-line error."""
    kernels = getattr(model, "kernel_seconds", 0.0)  # minirt.load ran the kernels once before the weights
    # a twin ran every kernel of the dense model (same array types: warm_kernels): running them again on the
    # model loads nothing (0.1 s at 1 thread, 0.4-0.8 s at 2 threads on cores shared with other work); a mode
    # may have swapped in Linears of other kernels
    twin_did = kernels and getattr(model, "mode", None) == "dense"
    warm = (model.warmup() if hasattr(model, "warmup") and not twin_did else 0.0) + kernels
    load_seconds -= kernels
    first = " (the first run compiles the kernels; later runs read them from the cache)" if warm > 3 else ""
    print(f"load: {load_seconds:.2f} s · warm-up: {warm:.2f} s{first}", file=sys.stderr)


def _unescape(s: str) -> str:
    """Backslash escapes typed on a command line (\\n, \\t, \\\\, \\u00e9 …) as the characters they name;
    other text, non-ASCII included, as it is."""
    import re
    return re.sub(r"\\(u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|[nrt0\\'\"])",
                  lambda m: m.group(0).encode("ascii").decode("unicode_escape"), s)


class _Interrupt:
    """Ctrl-C during a chat reply, taken at safe points only.

    The default handler raises KeyboardInterrupt wherever the interpreter is, which may be inside
    Numba's boxing of a typed list (it then surfaces as a SystemError) or halfway through a KV-cache
    update. While armed, the first Ctrl-C only sets a flag; `check()` raises between tokens and
    between prefill chunks. A second Ctrl-C raises at once, the hard way."""

    def __init__(self):
        self.hit = False
        self._old = None

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __enter__(self):
        import signal
        self.hit = False
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal
        signal.signal(signal.SIGINT, self._old)
        return False

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt


def _prefill_progress(interrupt: _Interrupt | None = None):
    """A progress(done, total) callback for Generation: a bar for prompts that take more than a moment."""
    from .progress import Progress
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if interrupt is not None:
            interrupt.check()
        if bar is None:
            bar = Progress("prompt", total, "tokens", delay=2.0)
        bar.update(done - bar.done)
        if done >= total:
            bar.close()
            bar = None  # the next prompt (a chat's next turn) gets a bar of its own
    return progress


def cmd_generate(args) -> None:
    if args.prompt is not None and args.prompt_file is not None:
        raise MinirtError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        try:
            prompt = open(args.prompt_file, encoding="utf-8", newline="").read()
        except OSError as e:
            raise MinirtError(f"cannot read prompt file {args.prompt_file}: {e.strerror}") from None
    elif args.prompt == "-":
        prompt = sys.stdin.read()
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise MinirtError("no prompt: pass --prompt TEXT (or --prompt-file FILE)")
    _check_args(args)
    model, load = _load_timed(args)
    gen = model.generate(prompt, chat=args.chat, system=args.system, progress=_prefill_progress(), **_sampling(args))
    _warm_up(model, load)
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(gen.stats.summary(), file=sys.stderr)
    if gen.mode_stats is not None:  # speculative, jacobi
        print(gen.mode_stats.summary(), file=sys.stderr)
    pinv = getattr(model, "pinv", None)
    if pinv is not None:
        print(f"pinv: window {pinv.window}, tol {pinv.tol:g}: {pinv.stats.fraction:.1%} of FFN rows predicted",
              file=sys.stderr)


CHAT_HELP = """commands:
  /bye (or Ctrl-D)      leave
  /clear                forget the conversation (the system message stays)
  /system TEXT          set the system message (and clear)
  /help                 this help
  \"\"\"                   start or end a message of several lines
Ctrl-C stops a reply and returns to the prompt."""


def _read_message(interactive: bool) -> str | None:
    """One user message: a line, or the lines between two \"\"\" (as in ollama). None at the end of input."""
    prompt = ">>> " if interactive else ""
    try:
        line = input(prompt) if interactive else sys.stdin.readline()
    except EOFError:
        return None
    if not interactive:
        if not line:
            return None
        line = line.rstrip("\n")
    if not line.lstrip().startswith('"""'):
        return line
    parts, rest = [], line.lstrip()[3:]
    while True:
        if rest.rstrip().endswith('"""'):
            parts.append(rest.rstrip()[:-3])
            return "\n".join(parts)
        parts.append(rest)
        try:
            rest = input("... ") if interactive else sys.stdin.readline()
        except EOFError:
            return "\n".join(parts)
        if not interactive:
            if not rest:
                return "\n".join(parts)
            rest = rest.rstrip("\n")


def cmd_chat(args) -> None:
    """A terminal front end over minirt.Chat: reads messages, streams replies, handles the commands."""
    from .chat import Chat
    _check_args(args)
    model, load = _load_timed(args)
    opts = _sampling(args)
    interrupt = _Interrupt()
    chat = Chat(model, system=args.system, ctx=opts.pop("ctx"), progress=_prefill_progress(interrupt), **opts)
    _warm_up(model, load)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("minirt chat: /help for commands, /bye or Ctrl-D to leave", file=sys.stderr)
    while True:
        try:
            text = _read_message(interactive)
        except KeyboardInterrupt:  # at the prompt, as ollama does: say how to leave
            print("\nUse Ctrl-D or /bye to leave.", file=sys.stderr)
            continue
        if text is None:
            if interactive:
                sys.stderr.write("\n")
            return
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("/bye", "/exit", "/quit", "exit", "quit"):
            return
        if cmd in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        if cmd == "/clear":
            chat.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if cmd.startswith("/system"):
            chat.system = cmd[len("/system"):].strip() or None
            chat.clear()
            print("(system message set; conversation cleared)", file=sys.stderr)
            continue
        if cmd.startswith("/"):
            print(f"unknown command {cmd.split()[0]}; /help lists them", file=sys.stderr)
            continue
        stream = None
        try:
            with interrupt:
                stream = chat.send(text)
                for piece in stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    interrupt.check()
        except KeyboardInterrupt:  # stop the reply (what came of it stays in the history), keep the chat
            if stream is not None:
                stream.close()
            sys.stdout.write("\n")
            print("(reply stopped)", file=sys.stderr)
            continue
        sys.stdout.write("\n\n" if interactive else "\n")
        sys.stdout.flush()
        for notice in chat.notices:
            print(f"({notice})", file=sys.stderr)
        chat.notices.clear()
        if not interactive or args.verbose:
            print(chat.last.stats.summary(), file=sys.stderr)


def cmd_perplexity(args) -> None:
    from .perplexity import perplexity
    from .registry import REGISTRY, pull, read_text
    path = args.file
    if not os.path.exists(path) and path in REGISTRY and REGISTRY[path].kind == "data":
        path = pull(path, args.cache_dir)
    text = read_text(path, args.file)
    if args.ctx < 4 or (args.chunks is not None and args.chunks < 1):
        raise MinirtError("--ctx must be ≥ 4 and --chunks ≥ 1")
    model = _load(args)
    r = perplexity(model, text, ctx=args.ctx, chunks=args.chunks)
    print(f"{r.n_tokens} tokens, {r.chunks} chunks of {args.ctx}, {r.seconds:.1f} s", file=sys.stderr)
    print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.stderr:.5f}")


def cmd_bench(args) -> None:
    import numba

    from . import bench
    if min(args.n_prompt, args.n_gen, args.depth) < 0 or args.repetitions < 1 or args.n_prompt + args.n_gen == 0:
        raise MinirtError("-p, -n and -d must be ≥ 0 (-p and -n not both 0) and -r ≥ 1")
    if args.mode == "jacobi":
        if args.n_gen < 9:
            raise MinirtError(f"bench --mode jacobi times decoding: give -n 9 or more, got {args.n_gen}")
        from .modes import jacobi
        from .modes import check
        check(args.mode, _mode_options(args), args.device)
        model = _load(args, pinv_tol=0.0)  # the bench installs the transition for each setting it times
        rows = jacobi.run_bench(model, bench.FREE_WRITING, args.n_gen, args.block, args.pinv_window,
                                [0.0, args.pinv_tol] if args.pinv_tol > 0 else [0.0])
        print(f"greedy, {len(bench.FREE_WRITING)} free prompts, {args.n_gen} tokens each, {numba.get_num_threads()} threads")
        print(jacobi.report_bench(rows, args.block, args.pinv_window))
        print(jacobi.report_costs(*jacobi.pass_costs(model, args.block), args.block, rows))
        return
    model = _load(args)
    if args.mode == "speculative":
        if args.prompts == "free":
            prompts = bench.FREE_WRITING
        else:
            from .registry import pull
            text = open(pull("botchan", args.cache_dir), "rb").read().decode("utf-8").replace("\r\n", " ")
            prompts = bench.grounded_prompts([text[i:i + 600] for i in (20000, 60000, 100000, 140000)])
        res = bench.run_speculative(model, prompts, args.n_gen, r=args.repetitions)  # the model's drafter and K
        print(f"greedy, {len(prompts)} {args.prompts} prompts × {args.repetitions}, {args.n_gen} tokens each, "
              f"{numba.get_num_threads()} threads; speedup = total plain time / total speculative time, prompts "
              "included; decode speedup: the same after the first token (the prompt's prefill is the same "
              "computation either way)")
        print("| model | drafter | K | acceptance | tokens per verify call | dense tok/s | speculative tok/s "
              "| speedup | decode speedup | identical output |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(bench.report_speculative(model.source.name if model.source else args.model, res,
                                       model.mode_options["draft"], model.mode_options["draft_k"]))
        return
    if args.cost_table:
        from .cpu import isa
        name = model.source.name if model.source else args.model
        print(bench.report_cost_table(bench.cost_table(model, r=max(args.repetitions, 3)), name, model.file_type,
                                      numba.get_num_threads(), isa.SELECTED))
        return
    if args.depth + max(args.n_prompt, args.n_gen) > model.cfg.max_ctx:
        raise MinirtError(f"-d plus -p/-n is larger than the model's context of {model.cfg.max_ctx}")
    res = bench.run(model, args.n_prompt, args.n_gen, args.repetitions, depth=args.depth)
    name = model.source.name if model.source else args.model
    ftype = "f32 (dequantized)" if args.dequantize else model.file_type
    print(bench.report(res, name, ftype, numba.get_num_threads(), args.n_prompt, args.n_gen, args.mode, args.depth))
    if args.mode == "pinv":
        print(f"pinv: window {model.pinv.window}, tol {model.pinv.tol:g}: {model.pinv.stats.fraction:.1%} of FFN "
              "rows predicted (random tokens; see tools/pinv_sweep.py for text)")


def cmd_quantize(args) -> None:
    from .quantize import quantize_gguf
    from .registry import resolve
    out = quantize_gguf(resolve(args.model, args.cache_dir), args.out, args.type)
    print(out)


def cmd_convert(args) -> None:
    from .convert import convert
    print(convert(args.src, args.dst, args.type, tokenizer=args.tokenizer))


def cmd_svd(args) -> None:
    import minirt

    from .modes.lowrank import check_choice, check_out, export, summary
    from .modes import check
    from .registry import cache_dir, resolve
    check_choice(*_factor_choice(args))  # svd asks for one explicitly (--mode lowrank defaults to energy 0.9)
    check("lowrank", _mode_options(args, "lowrank"))  # factor type, calibration file: before resolving
    src = resolve(args.model, args.cache_dir)
    if src.is_dir():
        raise MinirtError(f"{src}: svd exports from a GGUF file (convert a Hugging Face folder first: minirt convert)")
    out = args.out
    if out is None:
        e, r, p = _factor_choice(args)
        tag = f"e{e}" if e is not None else f"r{r}" if r is not None else f"p{p}"
        out = cache_dir(args.cache_dir) / (f"{src.stem}-lowrank-{tag}" + ("-cal" if args.calibration else "")
                                          + ("" if args.factor_type == "F32" else f"-{args.factor_type}"))
    check_out(out)  # before the work, not after it
    model = minirt.load(src, threads=args.threads, mode="lowrank", **_mode_options(args, "lowrank"))
    print(summary(model), file=sys.stderr)
    print(export(model, out))


def cmd_pull(args) -> None:
    from .registry import pull
    for name in args.names:
        print(pull(name, args.cache_dir, what="name"))


def cmd_rm(args) -> None:
    from .registry import remove
    for name in args.names:
        d, size = remove(name, args.cache_dir)
        print(f"deleted {d} ({size / 1e6:.1f} MB)")


def cmd_show(args) -> None:
    from .readers import describe
    from .registry import resolve
    for key, value in describe(resolve(args.model, args.cache_dir)).items():
        print(f"{key:>15}  {value}")


def cmd_list(args) -> None:
    from .registry import REGISTRY, cache_dir, entry_dir, exports, folder_size, is_present
    from .fetch import hf_cache
    print(f"cache: {cache_dir(args.cache_dir)}  (hub models: {hf_cache()})")
    for e in REGISTRY.values():
        size = folder_size(entry_dir(e, args.cache_dir))
        mark = f"present {size / 1e6:7.1f} MB" if is_present(e, args.cache_dir) else f"{'-':18}"
        alias = f" ({', '.join(e.aliases)})" if e.aliases else ""
        kind = "model" if e.kind == "models" else "data"
        print(f"{kind:6} {e.name + alias:28} {mark} {e.spec.get('description', '')}")
    for d in exports(args.cache_dir):
        print(f"{'export':6} {d.name:28} present {folder_size(d) / 1e6:7.1f} MB low-rank export (minirt svd)")


def cmd_serve(args) -> None:
    from .server import _require, serve
    _require()
    for flag, v, lo in (("--port", args.port, 0), ("--parallel", args.parallel, 1), ("--queue", args.queue, 0)):
        if v < lo:
            raise MinirtError(f"{flag} must be ≥ {lo}, got {v}")
    if args.device != "cpu" or getattr(args, "mode", "dense") != "dense":
        raise MinirtError("minirt serve runs dense decoding on the CPU (leave out --device)")
    args.mode = "dense"
    model, seconds = _load_timed(args)
    if args.ctx is not None:
        from .kvcache import context_size
        context_size(model.cfg.max_ctx, args.ctx)
    _warm_up(model, seconds)
    serve(model, args.name or str(args.model), host=args.host, port=args.port, parallel=args.parallel,
          ctx=args.ctx, api_key=args.api_key, queue=args.queue)


COMMANDS = {"serve": cmd_serve, "generate": cmd_generate, "chat": cmd_chat, "perplexity": cmd_perplexity, "bench": cmd_bench,
            "quantize": cmd_quantize, "convert": cmd_convert, "svd": cmd_svd, "pull": cmd_pull, "rm": cmd_rm,
            "list": cmd_list, "show": cmd_show}


def _one_line(text: str) -> str:
    """An error message as one printable line: text taken from files may hold newlines or terminal control
    sequences, which are shown escaped instead of acting on the terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv[:1] or os.environ.get("MINIRT_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = debug or args.debug
        if args.cmd is None:
            parser.print_help(sys.stderr)
            return 2
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise MinirtError(f"--threads must be ≥ 1, got {args.threads}")
        COMMANDS[args.cmd](args)
        return 0
    except MinirtError as e:
        print(f"minirt: error: {_one_line(str(e))}", file=sys.stderr)
        return 2 if "--help" in str(e) else 1
    except KeyboardInterrupt:
        print("minirt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug in minirt, not the user's input: one line, the traceback on request
        if debug:
            import traceback
            traceback.print_exc()
        where = "" if debug else " (run with --debug or MINIRT_DEBUG=1 for the traceback)"
        print(f"minirt: internal error: {_one_line(f'{type(e).__name__}: {e}')}{where}; please report it",
              file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
