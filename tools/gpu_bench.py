"""GPU benchmarks of minirt's CuPy backend (the BENCHMARKS.md "GPU backend" tables).

    python3 tools/gpu_bench.py [--models smollm2,smollm2-shape,gpt2-shape] [--skip-kernels] [--json OUT.json]

1. Device memory bandwidth: a 1 GiB device-to-device copy (bytes read + written), median of 5.
2. Kernel level: the fused low-rank kernel y = (x·Vᵀ)·Uᵀ against two cuBLAS GEMMs (cupy.matmul, float16)
   and against the HBM roofline (the fewest bytes: both factors read once, over the measured bandwidth), at
   decode shapes 576..8192 wide, T = 1 and 4 rows. Each variant runs 200 times inside one captured CUDA
   graph (launch gaps included, Python overhead not), cycling over enough weight copies to exceed 2× L2.
3. Models: decode tokens/s (mean ± std over runs) for dense, lowrank (energy 0.9) and speculative (n-gram
   drafter, grounded prompts) on SmolLM2-135M (its GGUF, if cached), a random SmolLM2-shaped LLaMA, and a
   random GPT-2-124M (transformers' GPT2Config()); in the same run, Hugging Face transformers' eager
   generate() of the same model (float16, greedy, 128 new tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import minirt  # noqa: E402
from minirt.cuda.backend import GLowRank, to_gpu  # noqa: E402


def ms(xs):
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def graph_time(cp, fn, reps: int) -> float:
    """Seconds per call of fn (reps calls captured in one graph; fn(i) may cycle inputs), median of 5."""
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        for i in range(3):
            fn(i)
        s.synchronize()
        s.begin_capture()
        try:
            for i in range(reps):
                fn(i)
        finally:
            g = s.end_capture()
        run = lambda: g.launch(stream=s)  # noqa: E731
        run()
        s.synchronize()
        times = []
        for _ in range(5):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(s)
            run()
            e1.record(s)
            e1.synchronize()
            times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3 / reps)
    return float(np.median(times))


def cublas_time(sets, x16, reps: int) -> float:
    """Seconds per y = (x·Vᵀ)·Uᵀ as two cuBLAS GEMMs (torch.mm, float16), reps of them in one CUDA graph
    (CuPy cannot capture cuBLAS calls; PyTorch can), median of 5."""
    import torch
    ws = [(torch.from_dlpack(v), torch.from_dlpack(u)) for v, u in sets]
    x = torch.from_dlpack(x16)
    mid = torch.empty((x.shape[0], ws[0][0].shape[0]), dtype=torch.float16, device=x.device)
    out = torch.empty((x.shape[0], ws[0][1].shape[0]), dtype=torch.float16, device=x.device)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            torch.mm(x, ws[i % len(ws)][0].t(), out=mid)
            torch.mm(mid, ws[i % len(ws)][1].t(), out=out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            torch.mm(x, ws[i % len(ws)][0].t(), out=mid)
            torch.mm(mid, ws[i % len(ws)][1].t(), out=out)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3 / reps)
    return float(np.median(times))


def kernel_bench(cp, bw: float, l2: int) -> list[dict]:
    from minirt.cuda.kernels import kernels
    k = kernels()
    rng = np.random.default_rng(0)
    rows = []
    shapes = [(576, 576, 144), (576, 1536, 144), (1536, 576, 144), (2048, 2048, 512), (4096, 4096, 1024),
              (8192, 8192, 2048), (8192, 8192, 512)]
    for K, N, r in shapes:
        wbytes = 2 * r * (K + N)
        nsets = int(min(64, max(1, -(-2 * l2 // wbytes))))
        sets = []
        for _ in range(nsets):
            u = rng.standard_normal((N, r)).astype(np.float32) / np.sqrt(r)
            v = rng.standard_normal((r, K)).astype(np.float32) / np.sqrt(K)
            sets.append((GLowRank(cp, k, u, v, None, "float16"), cp.asarray(u.astype(np.float16)),
                         cp.asarray(v.astype(np.float16))))
        for T in (1, 4):
            x32 = cp.asarray(rng.standard_normal((T, K)).astype(np.float32))
            x16 = x32.astype(cp.float16)
            out32 = cp.empty((T, N), cp.float32)
            default = k.prefetch
            k.prefetch = False
            t_fused = graph_time(cp, lambda i: sets[i % nsets][0](x32, out32, T, 0), 200)
            k.prefetch = True
            t_pf = graph_time(cp, lambda i: sets[i % nsets][0](x32, out32, T, 0), 200)
            k.prefetch = default
            t_cublas = cublas_time([(s[2], s[1]) for s in sets], x16, 200)
            # correctness of this very configuration
            lin, u16, v16 = sets[0]
            lin(x32, out32, T, 0)
            ref = (x16.astype(cp.float64) @ v16.T.astype(cp.float64)) @ u16.T.astype(cp.float64)
            rel = float(cp.linalg.norm(out32 - ref) / cp.linalg.norm(ref))
            nbytes = wbytes + 4 * T * (K + N)
            roof = nbytes / bw
            rows.append(dict(K=K, N=N, r=r, T=T, fused_us=t_fused * 1e6, fused_l2_prefetch_us=t_pf * 1e6,
                             cublas_us=t_cublas * 1e6,
                             roofline_us=roof * 1e6, fused_pct_roofline=100 * roof / t_fused,
                             fused_GBps=nbytes / t_fused / 1e9, speedup_vs_cublas=t_cublas / t_fused, rel_err=rel,
                             weight_sets=nsets))
            print(f"  {K}→{N} r={r} T={T}: fused {t_fused * 1e6:.2f} µs (with L2 prefetch of U {t_pf * 1e6:.2f}), "
                  f"cuBLAS×2 {t_cublas * 1e6:.2f} µs, "
                  f"roofline {roof * 1e6:.2f} µs ({100 * roof / t_fused:.0f}%), rel err {rel:.1e}", flush=True)
    return rows


# ---- models ------------------------------------------------------------------------------------------------
def hf_random(kind: str, folder: str):
    import torch
    import transformers
    torch.manual_seed(0)
    if kind == "gpt2-shape":
        cfg = transformers.GPT2Config(attn_implementation="eager")
        model = transformers.GPT2LMHeadModel(cfg)
    else:  # SmolLM2-135M's shape
        cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                       bos_token_id=1, eos_token_id=2, attn_implementation="eager")
        model = transformers.LlamaForCausalLM(cfg)
    model.eval().save_pretrained(folder, safe_serialization=True)
    return model


def hf_smollm2(path: str):
    """SmolLM2 in transformers, read from the same GGUF (dequantized by transformers), else None."""
    try:
        import transformers
        import torch
        return transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                                 attn_implementation="eager", dtype=torch.float16)
    except Exception as e:  # noqa: BLE001
        print(f"  transformers could not read the GGUF ({type(e).__name__}: {str(e)[:120]}); using the shape twin",
              flush=True)
        return None


def hf_generate_tps(model, vocab: int, n: int, runs: int) -> list[float]:
    import torch
    if next(model.parameters()).dtype != torch.float16:
        model = model.half()
    model = model.to("cuda").eval()
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).cuda()
    out = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        for _ in range(runs):
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()
            out.append(n / (time.perf_counter() - t))
    model.cpu()
    del model
    torch.cuda.empty_cache()
    return out


def decode_tps(g, n: int, runs: int, prompt: list[int]) -> list[float]:
    """Greedy decode of n tokens on the device (graph replays, one sync at the end), fresh context each run."""
    cp = g.cp
    cache = g.new_cache(len(prompt) + n + 1)
    g.decode_greedy(prompt, cache, n)  # captures the step graph
    out = []
    for _ in range(runs):
        cache.truncate(0)
        g.stream.synchronize()
        t = time.perf_counter()
        g.decode_greedy(prompt, cache, n)
        g.stream.synchronize()
        out.append(n / (time.perf_counter() - t))  # n forward steps (the 1-token prompt is one)
    del cp
    return out


def generate_tps(g, prompts, n: int, **kw) -> tuple[list[float], list[list[int]], object]:
    """Through Generation (streaming: one token read per step, text detokenized), decode tok/s per prompt."""
    from minirt.modes.speculative import SpecStats
    tps, toks, spec = [], [], SpecStats()
    g.generate(prompts[0], max_tokens=8, temperature=0, **kw).text()
    for p in prompts:
        gen = g.generate(p, max_tokens=n, temperature=0, **kw)
        gen.text()
        st = gen.stats
        if st.decode_tokens < 8:  # a prompt answered in a few tokens times nothing (kept out of the mean)
            print(f"    {len(st.tokens)} tokens ({st.stop_reason}): too few to time", flush=True)
        else:
            tps.append((st.decode_tokens - 1) / st.decode_seconds)  # as Stats.summary: steps after the first
            print(f"    {len(st.tokens)} tokens ({st.stop_reason}), decode {tps[-1]:.0f} tok/s", flush=True)
        toks.append(gen.stats.tokens)
        if gen.drafter is not None:
            spec.steps += gen.spec.steps
            spec.proposed += gen.spec.proposed
            spec.accepted += gen.spec.accepted
    return tps, toks, spec


def spec_tokens_tps(g, prompt_ids, n: int):
    """Greedy tokens/s (prefill included) of plain decoding and of speculative decoding with the n-gram
    drafter, on token-id prompts (no tokenizer needed), and whether both give the same tokens."""
    from minirt.cuda.backend import speculative_tokens_gpu
    from minirt.sampling import Sampler, SamplingParams
    from minirt.modes.speculative import NGramDrafter, SpecStats
    dense, spec, same, st = [], [], True, SpecStats()
    for ids in [prompt_ids[0]] + list(prompt_ids):  # the first round warms up (graphs for each T)
        cache = g.new_cache(len(ids) + n + 16)
        g.stream.synchronize()
        t = time.perf_counter()
        a = g.decode_greedy(ids, cache, n)
        dense.append(n / (time.perf_counter() - t))
        s1 = SpecStats()
        t = time.perf_counter()
        b = list(speculative_tokens_gpu(g, g.new_cache(len(ids) + n + 16), ids, Sampler(SamplingParams(temperature=0)),
                                        NGramDrafter(), 4, n, s1))
        spec.append(n / (time.perf_counter() - t))
        same &= a == b
        st.steps, st.proposed, st.accepted = st.steps + s1.steps, st.proposed + s1.proposed, st.accepted + s1.accepted
    return dense[1:], spec[1:], same, st


def model_bench(name: str, cpu, hf_model, n: int, runs: int, prompts) -> list[dict]:
    from minirt.modes.lowrank import with_lowrank
    rows = []
    vocab = cpu.cfg.vocab_size
    prompt = [1]
    g = to_gpu(cpu, "float16")
    dense = decode_tps(g, n, runs, prompt)
    rows.append(dict(model=name, mode="dense", weights="float16", MiB=g.weight_bytes / 2**20, tps=dense))
    print(f"  {name} dense fp16: {ms(dense)} tok/s ({g.weight_bytes / 2**20:.0f} MiB read per token)", flush=True)
    has_tok = cpu.tokenizer is not None and name.startswith("smollm2") and "shape" not in name
    if has_tok:
        gt, dense_toks, _ = generate_tps(g, prompts, n)
        st, spec_toks, last = generate_tps(g, prompts, n, mode="speculative", draft="ngram", draft_k=4)
        same = dense_toks == spec_toks
        rows.append(dict(model=name, mode="dense (generate, streamed)", weights="float16", tps=gt))
        rows.append(dict(model=name, mode="speculative ngram K=4 (generate)", weights="float16", tps=st,
                         identical=same, acceptance=last.acceptance, per_call=last.mean_accepted))
        print(f"  {name} generate dense {ms(gt)} · speculative {ms(st)} tok/s, identical {same}, "
              f"{last.summary()} (all prompts)", flush=True)
    if has_tok:
        ids = [cpu.tokenizer.encode(p) for p in prompts]
    else:  # random weights: prompts that repeat themselves (greedy output of such models loops too)
        rng = np.random.default_rng(0)
        ids = [[int(t) for t in rng.integers(0, vocab, 24)] * 3 for _ in range(4)]
    d, sp, same, st = spec_tokens_tps(g, ids, n)
    rows.append(dict(model=name, mode="dense (decode_greedy, prefill included)", weights="float16", tps=d))
    rows.append(dict(model=name, mode="speculative ngram K=4 (prefill included)", weights="float16", tps=sp,
                     identical=same, acceptance=st.acceptance, per_call=st.mean_accepted))
    print(f"  {name} token-level: dense {ms(d)} · speculative {ms(sp)} tok/s, identical {same}, {st.summary()}",
          flush=True)
    del g
    t = time.perf_counter()
    lr = with_lowrank(cpu, energy=0.9)
    g = to_gpu(lr, "float16")
    lrt = decode_tps(g, n, runs, prompt)
    rows.append(dict(model=name, mode="lowrank E=0.9", weights="float16", MiB=g.weight_bytes / 2**20, tps=lrt,
                     factor_s=time.perf_counter() - t))
    print(f"  {name} lowrank E=0.9: {ms(lrt)} tok/s ({g.weight_bytes / 2**20:.0f} MiB read per token)", flush=True)
    del g, lr
    if hf_model is not None:
        hf = hf_generate_tps(hf_model, vocab, n, 3)
        rows.append(dict(model=name, mode="HF transformers eager generate", weights="float16", tps=hf))
        print(f"  {name} HF eager fp16: {ms(hf)} tok/s; minirt dense / HF = {statistics.mean(dense) / statistics.mean(hf):.1f}x",
              flush=True)
    return rows


def profile_step(g, pos: int = 64) -> list[tuple[str, float]]:
    """Microseconds per kernel of one decode step (layer 0's kernels; 100 launches in a graph each)."""
    cp, k, c = g.cp, g.k, g.cfg
    cache = g.new_cache(256)
    cache.pos = pos
    with g.stream:
        posd = g._pos(cache)
        b = g._buffers(1)
        for key in ("x", "h", "hrows", "qkv", "q", "att", "act", "logits"):
            b[key][...] = cp.random.standard_normal(b[key].shape, dtype=cp.float32)
        cache.k[...] = cp.random.standard_normal(cache.k.shape, dtype=cp.float32)
        cache.v[...] = cp.random.standard_normal(cache.v.shape, dtype=cp.float32)
    g.stream.synchronize()
    L = g.layers[0]
    llama = c.arch == "llama"
    H, Hkv, hd, cap = c.n_heads, c.n_kv_heads, c.head_dim, cache.capacity
    kc, vc = cache.k[0], cache.v[0]
    items = [
        ("embed", lambda i: k.embed(b["tok"], g.embed_table, g.pos_embed, posd, b["x"], 1, b["st"])),
        ("norm + qkv", lambda i: L.qkv(b["x"], b["qkv"], 1, 0, nst=b["st"][0], norm=L.attn_norm, layer=not llama)),
        (f"rope + store + attention (pos {pos})", lambda i: k.attention(b["qkv"], posd, g.rope_cos, g.rope_sin, llama,
                                                                       kc, vc, 0.125, b["att"], 1, H, Hkv, hd, cap)),
        ("wo (+x, Σx²)", lambda i: L.wo(b["att"], b["x"], 1, 1, ost=b["st"][1])),
        ("norm + up (+act)", lambda i: L.up(b["x"], b["act"], 1, 2 if llama else 3, nst=b["st"][0], norm=L.ffn_norm,
                                            layer=not llama)),
        ("down (+x, Σx²)", lambda i: L.down(b["act"], b["x"], 1, 1, ost=b["st"][2])),
        ("final norm", lambda i: k.norm(b["x"], *g.norm[:2], g.norm[2], b["hrows"], 1, not llama)),
        ("head", lambda i: g.head(b["hrows"], b["logits"], 1, 0)),
        ("argmax", lambda i: k.argmax_step(b["logits"], c.vocab_size, b["tok"], g.pos_scratch, cache.hist, 0)),
        ("whole step", lambda i: g._step(1, cache, posd, b, "last", "none")),
    ]
    out = []
    for name, fn in items:
        t = graph_time(cp, fn, 20 if name == "whole step" else 100)
        out.append((name, t * 1e6))
        print(f"  {name}: {t * 1e6:.2f} µs", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,smollm2-shape,gpt2-shape")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="per-kernel times of a decode step of each model")
    args = ap.parse_args()
    import cupy as cp
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    l2 = int(props.get("l2CacheSize", 50 << 20))
    print(f"device: {name}, {dev.attributes['MultiProcessorCount']} SMs, L2 {l2 >> 20} MiB, CuPy {cp.__version__}",
          flush=True)
    report = dict(device=name)
    a = cp.ones(1 << 28, cp.float32)
    b = cp.empty_like(a)
    times = []
    for _ in range(6):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        b[...] = a
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e-3)
    bw = 2 * a.nbytes / float(np.median(times[1:]))
    del a, b
    report["bandwidth_GBps"] = bw / 1e9
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)", flush=True)
    if not args.skip_kernels:
        print("fused low-rank kernel:", flush=True)
        try:
            from cupy.cuda import driver

            from minirt.cuda.kernels import kernels
            kk = kernels()
            for name in ("lowrank", "gemv"):
                f = kk.fn(name, "float16")
                ptr = getattr(f, "ptr", None) or f.kernel.ptr
                print(f"  {name}<half>: {driver.funcGetAttribute(4, ptr)} registers", flush=True)
            print(f"  lowrank resident grid: {kk.lowrank_grid('float16', 8192)} blocks of 256 (8 KiB shared)")
        except Exception as e:  # noqa: BLE001
            print(f"  (no kernel attributes: {e})")
        report["kernels"] = kernel_bench(cp, bw, l2)
    from minirt.bench import FREE_WRITING, grounded_prompts
    prompts = FREE_WRITING
    try:
        from minirt.registry import REGISTRY, is_present, pull
        if is_present(REGISTRY["botchan"]):
            text = open(pull("botchan"), "rb").read().decode("utf-8").replace("\r\n", " ")
            prompts = grounded_prompts([text[i:i + 600] for i in (20000, 60000, 100000, 140000)])
    except Exception:  # noqa: BLE001
        pass
    print(f"prompts: {'grounded (botchan.txt passages)' if prompts is not FREE_WRITING else 'free writing'}", flush=True)
    report["models"] = []
    tmp = tempfile.mkdtemp()
    for m in args.models.split(","):
        print(f"model {m}:", flush=True)
        try:
            if m == "smollm2":
                from minirt.registry import REGISTRY, is_present, pull
                if not is_present(REGISTRY["smollm2-135m"]):
                    print("  GGUF not cached: skipped", flush=True)
                    continue
                path = str(pull("smollm2"))
                cpu = minirt.load(path)
                hf = hf_smollm2(path)
                if hf is None:
                    hf = hf_random("smollm2-shape", os.path.join(tmp, "twin"))
            else:
                folder = os.path.join(tmp, m)
                hf = hf_random(m, folder)
                cpu = minirt.load(folder)
            if args.profile:
                report.setdefault("profile", {})[m] = profile_step(to_gpu(cpu, "float16"))
            report["models"] += model_bench(m, cpu, hf, args.n, args.r, prompts)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            print(f"  {m} failed: {type(e).__name__}: {e}", flush=True)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    print("\n| model | mode | weights | tok/s | notes |")
    print("|---|---|---|---|---|")
    for r in report["models"]:
        note = ""
        if "acceptance" in r:
            note = f"acceptance {r['acceptance']:.0%}, {r['per_call']:.2f} tokens/verify, identical {r['identical']}"
        elif "MiB" in r:
            note = f"{r['MiB']:.0f} MiB weights read per token"
        print(f"| {r['model']} | {r['mode']} | {r['weights']} | {ms(r['tps'])} | {note} |")
    if "kernels" in report:
        print("\n| K→N | rank | T | fused µs | (with L2 prefetch) | 2× cuBLAS µs | roofline µs | fused % of roofline "
              "| fused vs cuBLAS |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in report["kernels"]:
            print(f"| {r['K']}→{r['N']} | {r['r']} | {r['T']} | {r['fused_us']:.2f} | {r['fused_l2_prefetch_us']:.2f} | "
                  f"{r['cublas_us']:.2f} | "
                  f"{r['roofline_us']:.2f} | {r['fused_pct_roofline']:.0f}% | {r['speedup_vs_cublas']:.2f}x |")


if __name__ == "__main__":
    main()
