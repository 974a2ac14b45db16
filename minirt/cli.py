"""Command line: a thin layer over the Python API. Text to stdout; progress, timings and errors to stderr."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import MinirtError
from .modes import MODES


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, instead of usage + message
        raise MinirtError(f"{message} (see: {self.prog} --help)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=os.environ.get("MINIRT_MODEL", "smollm2"),
                   help="registry name (see `minirt list`) or a path to a .gguf file / Hugging Face folder")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--cache-dir", default=None, help="where models are cached (default: weights/ or $MINIRT_HOME)")
    p.add_argument("--dequantize", action="store_true",
                   help="expand quantized matrices to float32 instead of running on the stored format")
    p.add_argument("--exact", action="store_true",
                   help="float32 activations in the quantized decode kernels (no int8 rounding; slower)")
    p.add_argument("--device", default="cpu", help="cpu, cuda (the GPU backend: CuPy, float16 weights on the "
                   "device) or auto (cuda when CuPy finds a GPU)")
    p.add_argument("--energy", type=float, default=None,
                   help="--mode lowrank: keep this fraction of each matrix's singular-value energy (default 0.9)")
    p.add_argument("--rank", type=int, default=None, help="--mode lowrank: keep this rank instead")
    p.add_argument("--pinv-window", type=int, default=16,
                   help="--mode pinv/jacobi: exactly computed FFN rows kept per layer to predict from (S)")
    p.add_argument("--pinv-tol", type=float, default=0.1,
                   help="--mode pinv/jacobi: a row is predicted when its relative residual is at most this (0: never)")
    _factor_args(p)


def _factor_args(p: argparse.ArgumentParser) -> None:
    """How low-rank factors are made (--mode lowrank on the fly, and minirt svd)."""
    p.add_argument("--params", type=float, default=None,
                   help="low rank: keep this fraction of each matrix's parameters instead")
    p.add_argument("--calibration", default=None,
                   help="low rank: activation-aware factors (SVD-LLM) from this text file's activations")
    p.add_argument("--calib-tokens", type=int, default=4096, help="tokens of the calibration text used")
    p.add_argument("--factor-type", default="F32", choices=("F32", "F16", "Q8_0"),
                   help="low rank: how the factors are stored (Q8_0 rounds ranks up to multiples of 32)")
    p.add_argument("--lowrank-head", action="store_true", help="low rank: factor the output head too")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=128)
    p.add_argument("--temperature", "--temp", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.05, help="0 = off")
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ctx", type=int, default=None, help="context size (default: the model's)")
    p.add_argument("--mode", choices=MODES, default="dense")
    p.add_argument("--draft", default="ngram",
                   help="drafter for --mode speculative: ngram[:N] (prompt lookup), layers:N (early exit), "
                        "lowrank[:E|:pP] (low-rank twin), or a model name/path with the same tokenizer")
    p.add_argument("--draft-k", type=int, default=4, help="draft length K (adapted as acceptance varies)")
    p.add_argument("--block", type=int, default=4, help="--mode jacobi: positions refined together (1-7)")


def build_parser() -> Parser:
    ap = Parser(prog="minirt", description="A minimal LLM runtime on numpy and Numba.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate text from a prompt")
    _model_args(g)
    g.add_argument("-p", "--prompt", default=None, help="prompt text ('-' reads standard input)")
    g.add_argument("-f", "--prompt-file", default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message for --chat")
    _sampling_args(g)

    c = sub.add_parser("chat", help="interactive chat with an instruct model (reads lines from stdin)")
    _model_args(c)
    c.add_argument("--system", default=None)
    _sampling_args(c)

    pp = sub.add_parser("perplexity", help="perplexity of a text file (llama-perplexity's method)")
    _model_args(pp)
    pp.add_argument("-f", "--file", required=True, help="text file, or a registry data name such as botchan")
    pp.add_argument("-c", "--ctx", type=int, default=512)
    pp.add_argument("--chunks", type=int, default=None, help="score only the first N windows")
    pp.add_argument("--mode", choices=("dense", "lowrank", "pinv"), default="dense")

    b = sub.add_parser("bench", help="prompt (pp) and generation (tg) speed, like llama-bench")
    _model_args(b)
    b.add_argument("-p", "--n-prompt", type=int, default=128)
    b.add_argument("-n", "--n-gen", type=int, default=128)
    b.add_argument("-r", "--repetitions", type=int, default=5)
    b.add_argument("--mode", choices=MODES, default="dense")
    b.add_argument("--draft", default="ngram", help="drafter for --mode speculative (see generate --help)")
    b.add_argument("--draft-k", type=int, default=4)
    b.add_argument("--block", type=int, default=4, help="--mode jacobi: positions refined together (1-7)")
    b.add_argument("--prompts", choices=("free", "grounded"), default="free",
                   help="speculative: free writing, or rewriting/summarising passages of botchan.txt")

    q = sub.add_parser("quantize", help="re-encode a GGUF file's matrices (F32, F16, BF16, Q8_0, Q4_0, Q4_1)")
    q.add_argument("model", help="registry name or GGUF path")
    q.add_argument("out", help="output .gguf path")
    q.add_argument("--type", required=True, choices=("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"))
    q.add_argument("--cache-dir", default=None)

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
    sv.add_argument("-o", "--out", default=None, help="output folder (default: weights/NAME-lowrank-…)")
    sv.add_argument("-t", "--threads", type=int, default=None)
    sv.add_argument("--cache-dir", default=None)

    pl = sub.add_parser("pull", help="fetch models or data into the cache ahead of time")
    pl.add_argument("names", nargs="+")
    pl.add_argument("--cache-dir", default=None)

    ls = sub.add_parser("list", help="known models and data, and whether they are cached")
    ls.add_argument("--cache-dir", default=None)
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
                        exact=args.exact, device=args.device, mode=args.mode, **options)
    if args.mode == "lowrank":
        from .lowrank import summary
        print(summary(model), file=sys.stderr)
    return model


def _factor_choice(args):
    return args.energy, args.rank, getattr(args, "params", None)


def _sampling(args) -> dict:
    """generate()'s sampling options; the mode and its options are the model's (minirt.load composed them)."""
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop,
                ctx=args.ctx)


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
    model = _load(args)
    gen = model.generate(prompt, chat=args.chat, system=args.system, **_sampling(args))
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


def cmd_chat(args) -> None:
    _check_args(args)
    model = _load(args)
    tok = model.tokenizer
    tok.chat_prompt("")  # fails early, with one line, for a model without a chat template
    history = ""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        turn = tok.chat_prompt(line.rstrip("\n"), args.system if not history else "")
        if history:  # later turns: no system block, just the user turn after what came before
            turn = turn[turn.index("<|im_start|>user"):]
        prompt = history + turn
        gen = model.generate(prompt, **_sampling(args))
        reply = ""
        for piece in gen:
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(gen.stats.summary(), file=sys.stderr)
        history = prompt + reply + "<|im_end|>\n"


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
    if min(args.n_prompt, args.n_gen) < 0 or args.repetitions < 1 or args.n_prompt + args.n_gen == 0:
        raise MinirtError("-p and -n must be ≥ 0 (not both 0) and -r ≥ 1")
    if args.mode == "jacobi":
        if args.n_gen < 9:
            raise MinirtError(f"bench --mode jacobi times decoding: give -n 9 or more, got {args.n_gen}")
        from . import jacobi
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
              f"{numba.get_num_threads()} threads; speedup = total plain time / total speculative time")
        print("| model | drafter | K | acceptance | tokens per verify call | dense tok/s | speculative tok/s "
              "| speedup | identical output |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(bench.report_speculative(model.source.name if model.source else args.model, res,
                                       model.mode_options["draft"], model.mode_options["draft_k"]))
        return
    if max(args.n_prompt, args.n_gen) > model.cfg.max_ctx:
        raise MinirtError(f"-p/-n larger than the model's context of {model.cfg.max_ctx}")
    res = bench.run(model, args.n_prompt, args.n_gen, args.repetitions)
    name = model.source.name if model.source else args.model
    ftype = "f32 (dequantized)" if args.dequantize else model.file_type
    print(bench.report(res, name, ftype, numba.get_num_threads(), args.n_prompt, args.n_gen, args.mode))
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

    from .lowrank import check_choice, check_out, export, summary
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
        print(pull(name, args.cache_dir))


def cmd_list(args) -> None:
    from .registry import REGISTRY, cache_dir, is_present
    print(f"cache: {cache_dir(args.cache_dir)}")
    for e in REGISTRY.values():
        mark = "present" if is_present(e, args.cache_dir) else "-"
        alias = f" ({', '.join(e.aliases)})" if e.aliases else ""
        kind = "model" if e.kind == "models" else "data"
        print(f"{kind:5} {e.name + alias:28} {mark:8} {e.spec.get('description', '')}")


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "perplexity": cmd_perplexity, "bench": cmd_bench,
            "quantize": cmd_quantize, "convert": cmd_convert, "svd": cmd_svd, "pull": cmd_pull, "list": cmd_list}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise MinirtError(f"--threads must be ≥ 1, got {args.threads}")
        COMMANDS[args.cmd](args)
        return 0
    except MinirtError as e:
        print(f"minirt: error: {e}", file=sys.stderr)
        return 2 if "--help" in str(e) else 1
    except KeyboardInterrupt:
        print("minirt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
