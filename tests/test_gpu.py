"""GPU backend (minirt/cuda/backend.py, minirt/cuda/kernels.py).

Default run (no GPU here): `--device cuda` fails with one line before loading anything. Tests marked gpu
run on a machine with CUDA and CuPy (tools/gpu_tests.sh; `python -m pytest -m gpu tests/test_gpu.py`):
GPU logits against the CPU forward pass (independent code: Numba kernels, float32) for every mode,
through the graph-captured decode step and cache rollback; the fused low-rank kernel against float64
numpy; the verification kernel against minirt.modes.speculative.speculative_tokens' own acceptance rule on the
same random numbers; device sampling against Sampler.distribution.

Block formats (Q8_0, Q4_0, Q4_1) stay as stored on the device: the quantized gemv against float64 numpy on
the CPU's own dequantization of the same blocks; SmolLM2 in each block format against the CPU `--exact`
path (the same blocks, float32 activations): logits within 1e-3 of max|logit|, greedy tokens equal up to the
first step where the CPU's top-2 gap is ≤ 1e-3. A model the backend cannot run is refused before upload.

Tolerances: with float32 weights on the GPU, logits agree with the CPU within 5e-4 (logits of std ≈ 1:
only summation order differs); with float16 weights within 2% of the largest |logit| (bfloat16: 6%),
which is the rounding of the weights themselves.
"""
from __future__ import annotations

import numpy as np
import pytest

import minirt
from minirt.errors import MinirtError
from minirt.cuda.backend import cuda_unavailable

NO_GPU = cuda_unavailable()
needs_gpu = pytest.mark.skipif(NO_GPU is not None, reason=f"no CUDA: {NO_GPU}")


# ---- default run: no GPU ------------------------------------------------------------------------------
@pytest.mark.skipif(NO_GPU is None, reason="a GPU is present")
def test_device_cuda_without_gpu_fails_with_one_line(capsys):
    from minirt.cli import main
    rc = main(["generate", "--device", "cuda", "-p", "hi", "-m", "/nonexistent/model.gguf"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "--device cuda" in err and "nonexistent" not in err
    with pytest.raises(MinirtError, match="device cuda"):
        minirt.load("/nonexistent/model.gguf", device="cuda")
    from minirt.cuda.backend import resolve_device
    assert resolve_device("auto") == "cpu"


def test_unknown_device_is_one_line(capsys):
    from minirt.cli import main
    assert main(["bench", "--device", "tpu", "-m", "/nonexistent/model.gguf"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown device 'tpu'" in err


def test_refused_before_upload(tmp_path_factory):
    """An architecture or a matrix format the GPU backend lacks: one line, before any upload (no GPU needed)."""
    import copy
    from dataclasses import replace

    from minirt.cuda.backend import gpu_refusal, to_gpu
    from minirt.linear import Linear
    kind, shape = SHAPES["llama_untied"]
    m = minirt.load(_hf_folder(tmp_path_factory, "refuse", kind, **shape))
    assert gpu_refusal(m) is None
    other = copy.copy(m)
    other.cfg = replace(m.cfg, arch="gemma3")
    odd = copy.copy(m)
    odd.layers = [copy.copy(L) for L in m.layers]

    class KQuant(Linear):  # a format without GPU kernels (as the K-quant Linear is, for now)
        in_features, out_features = m.layers[1].wo.in_features, m.layers[1].wo.out_features
    odd.layers[1].wo = KQuant()
    for bad, words in ((other, "gemma3 models"), (odd, "KQuant matrix (layer 1 wo)")):
        why = gpu_refusal(bad)
        assert words in why and "\n" not in why
        with pytest.raises(MinirtError, match="GPU backend"):
            to_gpu(bad)  # raises before resolve_device / CuPy: works without a GPU too


# ---- models for the GPU tests --------------------------------------------------------------------------
def _hf_folder(tmp_path_factory, name: str, kind: str, **shape):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.test_parity import _randomize
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(attn_implementation="eager", **shape)
        model = transformers.GPT2LMHeadModel(cfg).eval()
    else:
        cfg = transformers.LlamaConfig(attn_implementation="eager", rms_norm_eps=1e-5, **shape)
        model = transformers.LlamaForCausalLM(cfg).eval()
    _randomize(model, 7)
    folder = tmp_path_factory.mktemp("gpu") / name
    model.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


SHAPES = {
    "gpt2": ("gpt2", dict(vocab_size=1000, n_positions=256, n_embd=768, n_layer=2, n_head=12, bos_token_id=1,
                          eos_token_id=2)),  # GPT2Config's 50256 is outside this vocabulary (validate refuses it)
    "llama": ("llama", dict(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256,
                            rope_theta=100000.0, tie_word_embeddings=True)),
    "llama_untied": ("llama", dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)),
}


@pytest.fixture(scope="module")
def cpu_models(tmp_path_factory):
    if NO_GPU is not None:
        pytest.skip(f"no CUDA: {NO_GPU}")
    return {k: minirt.load(_hf_folder(tmp_path_factory, k, kind, **shape)) for k, (kind, shape) in SHAPES.items()}


def _ids(model, n=20, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, model.cfg.vocab_size, n)]


TOL = {"float32": 5e-4, "float16": 2e-2, "bfloat16": 6e-2}


def _close(got, ref, dtype):
    err = np.abs(got - ref).max()
    bound = TOL[dtype] * (1 if dtype == "float32" else np.abs(ref).max())
    assert err <= bound, f"max |Δ| {err:.3g} > {bound:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_cpu(name, dtype, cpu_models):
    from minirt.cuda.backend import to_gpu
    m = cpu_models[name]
    g = to_gpu(m, dtype)
    ids = _ids(m)
    ref = m.logits(ids)
    _close(g.logits(ids), ref, dtype)
    # incremental: 8 + single steps (graph-captured from the second on) + a 3-row verification-sized step
    cache = g.new_cache(64)
    rows = [g.forward(ids[:8], cache, logits="all")]
    for t in ids[8:14]:
        rows.append(g.forward([t], cache))
    rows.append(g.forward(ids[14:17], cache, logits="all"))
    rows.append(g.forward(ids[17:20], cache, logits="all"))
    _close(np.concatenate(rows), ref, dtype)
    # roll back and continue: the same rows again
    cache.truncate(10)
    _close(g.forward(ids[10:13], cache, logits="all"), ref[10:13], dtype)
    _close(g.forward(ids[13:16], cache, logits="all"), ref[13:16], dtype)
    _close(g.forward(ids[16:20], cache, logits=[0, 3]), ref[[16, 19]], dtype)
    # the persistent layers kernel (all layers in one launch, MINIRT_GPU_LAYERS=1): same rows
    g.persistent = True
    cache = g.new_cache(64)
    rows = [g.forward(ids[:12], cache, logits="all")] + [g.forward([t], cache) for t in ids[12:17]]
    rows.append(g.forward(ids[17:20], cache, logits="all"))
    _close(np.concatenate(rows), ref, dtype)


def _lowrank_model(m, rank_frac=0.25, seed=0):
    """The CPU model with every layer matrix replaced by its rank-r truncated SVD (numpy, float32)."""
    import copy

    from minirt.cuda.backend import float_matrix
    from minirt.modes.lowrank import LowRank
    out = copy.copy(m)
    out.layers = []
    for L in m.layers:
        L2 = copy.copy(L)
        for attr in ("qkv", "wo", "up", "down"):
            lin = getattr(L, attr)
            w = float_matrix(lin)
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            r = max(1, int(rank_frac * len(s))) | 1  # odd ranks: exercises the padding to a multiple of 8
            setattr(L2, attr, LowRank(np.ascontiguousarray(u[:, :r] * s[:r]), np.ascontiguousarray(vt[:r]), lin.bias))
        out.layers.append(L2)
    out._scratch = {}
    out.lowrank = ["test"]
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(SHAPES))
def test_lowrank_mode_matches_cpu(name, cpu_models):
    from minirt.cuda.backend import to_gpu
    lr = _lowrank_model(cpu_models[name])
    g = to_gpu(lr, "float32")
    ids = _ids(lr)
    ref = lr.logits(ids)
    _close(g.logits(ids), ref, "float32")
    cache = g.new_cache(64)
    rows = [g.forward(ids[:5], cache, logits="all")] + [g.forward([t], cache) for t in ids[5:20]]
    _close(np.concatenate(rows), ref, "float32")
    _close(to_gpu(lr, "float16").logits(ids), ref, "float16")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_decode_on_device_matches_cpu(name, cpu_models):
    """decode_greedy (argmax on the device, graph replays, one sync) gives the CPU's greedy tokens."""
    from minirt.cuda.backend import to_gpu
    m = cpu_models[name]
    g = to_gpu(m, "float32")
    ids = _ids(m, 12, seed=3)
    cpu, cache = [], m.new_cache(64)
    logits = m.forward(ids, cache)[0]
    for _ in range(24):
        cpu.append(int(np.argmax(logits)))
        logits = m.forward([cpu[-1]], cache)[0]
    assert g.decode_greedy(ids, g.new_cache(64), 24) == cpu


@pytest.mark.gpu
def test_speculative_greedy_identical_to_dense(cpu_models):
    from minirt.cuda.backend import speculative_tokens_gpu, to_gpu
    from minirt.sampling import Sampler, SamplingParams
    from minirt.modes.speculative import NGramDrafter, SpecStats
    m = cpu_models["llama"]
    g = to_gpu(m, "float32")
    ids = _ids(m, 6, seed=5) * 4  # repetitive: the n-gram drafter proposes, and some drafts are accepted
    dense = g.decode_greedy(ids, g.new_cache(128), 40)
    st = SpecStats()
    spec = list(speculative_tokens_gpu(g, g.new_cache(128), ids, Sampler(SamplingParams(temperature=0)),
                                       NGramDrafter(), 4, 40, st))
    assert spec == dense
    assert st.proposed > 0 and st.steps < 40


@pytest.mark.gpu
def test_speculative_lowrank_twin_drafter(cpu_models):
    """--draft lowrank on the device: the factored twin runs on the GPU and greedy output stays identical."""
    from minirt.cuda.backend import speculative_tokens_gpu, to_gpu
    from minirt.sampling import Sampler, SamplingParams
    from minirt.modes.speculative import SpecStats, make_drafter
    g = to_gpu(cpu_models["llama"], "float32")
    twin = g.lowrank_twin("")
    assert type(twin) is type(g) and twin.lowrank
    ids = _ids(g.cpu, 10, seed=7)
    dense = g.decode_greedy(ids, g.new_cache(64), 24)
    st = SpecStats()
    drafter = make_drafter(g, "lowrank", 64)
    assert drafter.model is twin
    spec = list(speculative_tokens_gpu(g, g.new_cache(64), ids, Sampler(SamplingParams(temperature=0)), drafter, 3,
                                       24, st))
    assert spec == dense and st.steps > 0


# ---- the fused low-rank kernel -----------------------------------------------------------------------
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_fused_lowrank_kernel_vs_float64(dtype):
    import cupy as cp

    from minirt.cuda.backend import GLowRank
    from minirt.cuda.kernels import kernels
    k = kernels()
    rng = np.random.default_rng(1)
    for K, r, N, mode in [(576, 37, 1536, 0), (576, 144, 576, 1), (64, 8, 256, 2), (768, 200, 3072, 3),
                          (4096, 1024, 4096, 0), (8192, 64, 8192, 2), (2048, 512, 8192, 3), (8192, 256, 8192, 1)]:
        u = rng.standard_normal((N, r)).astype(np.float32) / np.sqrt(r)
        v = rng.standard_normal((r, K)).astype(np.float32) / np.sqrt(K)
        b = rng.standard_normal(N).astype(np.float32)
        lin = GLowRank(cp, k, u, v, b, dtype)
        # the reference uses the rounded weights the device holds, in float64
        ud = _device_weights(lin.u, dtype)[:, :r]
        vd = _device_weights(lin.v, dtype)[:r]
        for T in (1, 2, 5, 8):
            x = rng.standard_normal((T, K)).astype(np.float32)
            width = N // 2 if mode == 2 else N
            out0 = rng.standard_normal((T, width)).astype(np.float32)
            out = cp.asarray(out0)
            lin(cp.asarray(x), out, T, mode)
            y = (x.astype(np.float64) @ vd.T) @ ud.T + b
            if mode == 1:
                ref = out0 + y
            elif mode == 2:
                g_, up = y[:, :width], y[:, width:]
                ref = g_ / (1 + np.exp(-g_)) * up
            elif mode == 3:
                ref = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
            else:
                ref = y
            got = out.get()
            rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert rel < 1e-5, (K, r, N, mode, T, rel)


def _device_weights(a, dtype) -> np.ndarray:
    h = a.get()
    if dtype == "bfloat16":
        return (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return h.astype(np.float64)


# ---- verification kernel vs the CPU acceptance rule -----------------------------------------------------
class _Uniforms:
    """A stand-in for the Sampler's numpy Generator: hands out given uniforms; choice() is numpy's rule
    (first index whose normalized cumulative sum exceeds u)."""

    def __init__(self, us):
        self.us, self.i = list(us), 0

    def random(self, *a):
        u = self.us[self.i]
        self.i += 1
        return u

    def choice(self, n, p):
        cdf = np.cumsum(p)
        cdf /= cdf[-1]
        return int(np.searchsorted(cdf, self.random(), side="right"))


class _FixedModel:
    def __init__(self, prefill, rows):
        self.prefill, self.rows = prefill, rows

    def forward(self, tokens, cache, logits="last", progress=None):
        cache.pos += len(tokens)
        return self.prefill[None] if logits == "last" else self.rows


class _Cache:
    capacity = 1000

    def __init__(self):
        self.pos = 0

    def truncate(self, p):
        self.pos = p


class _FixedDrafter:
    def __init__(self, draft, qs):
        self.draft, self.qs = draft, qs

    def start(self, context, cache):
        pass

    def propose(self, context, k, sampler):
        assert k == len(self.draft) or not self.draft
        return list(self.draft), self.qs

    def rollback(self, context):
        pass


def _cpu_rule(rows, draft, qs, us, params):
    """(accepted, next token) from minirt.modes.speculative.speculative_tokens itself."""
    from minirt.sampling import Sampler
    from minirt.modes.speculative import SpecStats, speculative_tokens
    s = Sampler(params)
    s.rng = _Uniforms([0.5] + list(us))  # the first uniform goes to the prompt's token
    st = SpecStats()
    gen = speculative_tokens(_FixedModel(rows[0], rows), _Cache(), [1, 2, 3], s, _FixedDrafter(draft, qs),
                             max(1, len(draft)), 100, st, adaptive=False)
    next(gen)
    out = [next(gen)]
    n_ok = st.accepted
    out += [next(gen) for _ in range(n_ok)]
    assert out[:n_ok] == list(draft[:n_ok])
    return n_ok, out[-1]


def _norm64(p):
    p = p.astype(np.float64)
    return p / p.sum()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("with_q", [True, False])
def test_verify_kernel_matches_cpu_rule(greedy, with_q):
    import cupy as cp

    from minirt.cuda.kernels import kernels
    from minirt.sampling import SamplingParams
    if greedy and with_q:
        pytest.skip("greedy acceptance ignores q")
    k = kernels()
    rng = np.random.default_rng(11)
    V = 3000
    params = SamplingParams(temperature=0 if greedy else 1.0, top_k=0, top_p=1.0, min_p=0.0)
    result = cp.zeros(2, cp.int32)
    seen_ok = set()
    for trial in range(150):
        K = int(rng.integers(0, 7))
        logits = (rng.standard_normal((K + 1, V)) * 6).astype(np.float32)
        p = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
        p = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
        if greedy:
            rows_cpu = logits
            draft = [int(np.argmax(logits[i])) if rng.random() < 0.7 else int(rng.integers(V)) for i in range(K)]
            qs = None
        else:
            rows_cpu = np.log(p.astype(np.float64))  # the CPU's distribution() of these gives p back
            q = None
            if with_q:
                noise = np.exp(rng.standard_normal((K, V)) * 3)
                q = 0.6 * p[:K] + 0.4 * noise / noise.sum(axis=1, keepdims=True)
                q = (q / q.sum(axis=1, keepdims=True)).astype(np.float32)
                draft = [int(rng.choice(V, p=_norm64(q[i]))) for i in range(K)]
            else:
                draft = [int(rng.choice(V, p=_norm64(p[i]))) if rng.random() < 0.8
                         else int(rng.integers(V)) for i in range(K)]
            qs = None if q is None else [q[i].astype(np.float64) for i in range(K)]
        us = rng.random(K + 1).astype(np.float32)
        want = _cpu_rule(rows_cpu, draft, qs, us.astype(np.float64), params)
        P = cp.asarray(logits if greedy else p)
        Q = None if not qs else cp.asarray(np.stack(qs).astype(np.float32))
        d = cp.asarray(np.asarray(draft or [0], np.int32))
        k.verify(P, V, d, K, Q, cp.asarray(us), greedy, result)
        got = tuple(int(v) for v in result.get())
        assert got == want, (trial, K, got, want)
        seen_ok.add(min(got[0], 2))
    assert seen_ok == {0, 1, 2}  # rejections, partial and long acceptances all occurred


@pytest.mark.gpu
@needs_gpu
def test_device_distribution_matches_sampler():
    import cupy as cp

    from minirt.cuda.backend import device_distribution
    from minirt.sampling import Sampler, SamplingParams
    rng = np.random.default_rng(2)
    for params in [SamplingParams(0.8, 40, 0.95, 0.05), SamplingParams(1.3, 0, 0.9, 0.0),
                   SamplingParams(0.7, 5, 1.0, 0.1, repetition_penalty=1.3), SamplingParams(0.0, repetition_penalty=1.2)]:
        x = (rng.standard_normal((3, 500)) * 2).astype(np.float32)
        hist = [3, 17, 17, 250]
        seen = np.zeros((3, 500), bool)
        seen[:, hist] = True
        got = device_distribution(cp, cp.asarray(x), params, cp.asarray(seen)).get()
        s = Sampler(params)
        for i in range(3):
            np.testing.assert_allclose(got[i], s.distribution(x[i], hist), atol=1e-9)


# ---- SmolLM2 (skipped where its GGUF is not cached) --------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_pair():
    if NO_GPU is not None:
        pytest.skip(f"no CUDA: {NO_GPU}")
    from minirt.registry import REGISTRY, is_present
    if not is_present(REGISTRY["smollm2-135m"]):
        pytest.skip("SmolLM2 GGUF not cached")
    cpu = minirt.load("smollm2", exact=True)
    return cpu, minirt.cuda.backend.to_gpu(cpu, "float32"), minirt.cuda.backend.to_gpu(cpu, "float16")


PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]


@pytest.mark.gpu
def test_smollm2_logits_and_greedy_text(smollm2_pair):
    cpu, g32, g16 = smollm2_pair
    ids = cpu.tokenizer.encode(PROMPTS[0] + " there was a little girl who lived in a village near the forest.")
    ref = cpu.logits(ids)
    err32 = np.abs(g32.logits(ids) - ref).max()
    err16 = np.abs(g16.logits(ids) - ref).max() / np.abs(ref).max()
    print(f"SmolLM2 max |Δ logits|: float32 weights {err32:.2e}; float16 weights {err16:.2e} of max|logit|")
    assert err32 < 2e-3 and err16 < 2e-2
    for prompt in PROMPTS:
        want = cpu.generate(prompt, max_tokens=32, temperature=0).text()
        assert g32.generate(prompt, max_tokens=32, temperature=0).text() == want
        fast = g16.generate(prompt, max_tokens=32, temperature=0)
        fast.text()
        assert len(fast.stats.tokens) > 0


@pytest.mark.gpu
def test_smollm2_speculative_and_sampling(smollm2_pair):
    cpu, g32, g16 = smollm2_pair
    text = "The cat sat on the mat. The cat sat on the mat. The cat"
    dense = g16.generate(text, max_tokens=48, temperature=0)
    want = dense.text()
    spec = g16.generate(text, max_tokens=48, temperature=0, mode="speculative", draft="ngram", draft_k=4)
    assert spec.text() == want and spec.spec.accepted > 0
    early = g16.generate(text, max_tokens=24, temperature=0, mode="speculative", draft="layers:12", draft_k=3)
    assert early.stats.tokens == dense.stats.tokens[:len(early.stats.tokens)]
    s1 = g16.generate(text, max_tokens=24, seed=5)
    s1.text()
    s2 = g16.generate(text, max_tokens=24, seed=5)
    s2.text()
    assert s1.stats.tokens == s2.stats.tokens  # seeded sampling on the device is reproducible
    sampled_spec = g16.generate(text, max_tokens=24, seed=5, mode="speculative", draft="ngram")
    assert len(sampled_spec.text()) > 0


# ---- block formats on the device ------------------------------------------------------------------------
def _random_quant(qtype: str, N: int, K: int, seed: int):
    """A Quant of random blocks (scales ~1e-2, quants uniform) and its float64 dequantization by the CPU."""
    from minirt.linear import Quant
    from minirt.readers.base import Tensor
    rng = np.random.default_rng(seed)
    block, qoff, moff = Quant.FORMATS[qtype]
    raw = rng.integers(0, 256, (N, K // 32, block), dtype=np.uint8)
    raw[:, :, 0:2] = (rng.random((N, K // 32)) * 0.02 + 0.001).astype(np.float16)[..., None].view(np.uint8)
    if moff:
        raw[:, :, 2:4] = (rng.standard_normal((N, K // 32)) * 0.01).astype(np.float16)[..., None].view(np.uint8)
    q = Quant(Tensor(raw.reshape(N, -1), qtype, (N, K)))
    return q, q.dequantized().astype(np.float64)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gemv_vs_float64(qtype):
    """gemv on the blocks as stored (plain, residual add, SwiGLU, norm folded in) against float64 numpy."""
    import cupy as cp

    from minirt.cuda.backend import quant_blocks
    from minirt.cuda.kernels import kernels
    k = kernels()
    rng = np.random.default_rng(1)
    for N, K, T in ((96, 576, 1), (64, 1536, 3), (40, 2048, 6)):
        q, w = _random_quant(qtype, N, K, N + K)
        qm = quant_blocks(cp, q)
        assert qm.nbytes == N * K // 32 * {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]  # the file's block bytes
        x = rng.standard_normal((T, K))
        bias = rng.standard_normal(N)
        xd = cp.asarray(x.astype(np.float32))
        ref = x @ w.T + bias
        out = cp.full((T, N), np.nan, cp.float32)
        k.gemv(xd, qm, cp.asarray(bias.astype(np.float32)), out, T, 0)
        np.testing.assert_allclose(out.get(), ref, rtol=0, atol=2e-5 * np.abs(ref).max() + 1e-6)
        base = rng.standard_normal((T, N)).astype(np.float32)
        out = cp.asarray(base)
        k.gemv(xd, qm, None, out, T, 1)  # residual
        np.testing.assert_allclose(out.get(), base + x @ w.T, rtol=0, atol=2e-5 * np.abs(ref).max() + 1e-6)
        half = N // 2  # SwiGLU over gate | up halves
        out = cp.full((T, half), np.nan, cp.float32)
        k.gemv(xd, qm, None, out, T, 2)
        g, u = x @ w[:half].T, x @ w[half:].T
        want = g / (1 + np.exp(-g)) * u
        np.testing.assert_allclose(out.get(), want, rtol=0, atol=1e-4 * np.abs(want).max() + 1e-6)
        # RMSNorm folded in: statistics (Σx, Σx²) in float64 as the step keeps them
        nw = rng.standard_normal(K).astype(np.float32)
        st = cp.asarray(np.stack([x.sum(1), (x * x).sum(1)], 1))
        out = cp.full((T, N), np.nan, cp.float32)
        k.gemv(xd, qm, None, out, T, 0, nst=st, norm=(cp.asarray(nw), None, 1e-5), layer=False)
        h = x / np.sqrt((x * x).mean(1, keepdims=True) + 1e-5) * nw
        ref = h @ w.T
        np.testing.assert_allclose(out.get(), ref, rtol=0, atol=2e-5 * np.abs(ref).max() + 1e-6)


@pytest.fixture(scope="module")
def smollm2_formats(tmp_path_factory):
    """SmolLM2 in Q4_1 (the registry's file) and re-encoded to Q8_0 and Q4_0 (minirt quantize): CPU --exact models."""
    if NO_GPU is not None:
        pytest.skip(f"no CUDA: {NO_GPU}")
    pytest.importorskip("gguf")
    from minirt.quantize import quantize_gguf
    from minirt.registry import REGISTRY, is_present, pull
    if not is_present(REGISTRY["smollm2-135m"]):
        pytest.skip("SmolLM2 GGUF not cached")
    src = pull("smollm2")
    out = {"Q4_1": minirt.load(src, exact=True)}
    d = tmp_path_factory.mktemp("formats")
    for qt in ("Q8_0", "Q4_0"):
        out[qt] = minirt.load(str(quantize_gguf(src, d / f"smollm2.{qt}.gguf", qt, progress=False)), exact=True)
    return out


def _greedy_with_gaps(cpu, ids, n):
    """CPU greedy tokens and each step's top-2 logit gap."""
    cache = cpu.new_cache(len(ids) + n)
    logits = cpu.forward(ids, cache)[0]
    toks, gaps = [], []
    for _ in range(n):
        top = np.sort(logits)[-2:]
        toks.append(int(np.argmax(logits)))
        gaps.append(float(top[1] - top[0]))
        logits = cpu.forward([toks[-1]], cache)[0]
    return toks, gaps


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0", "Q4_0"])
def test_smollm2_blocks_on_device_match_cpu_exact(qtype, smollm2_formats):
    from minirt.cuda.backend import to_gpu
    cpu = smollm2_formats[qtype]
    g = to_gpu(cpu)  # as stored
    assert g.layers_type == qtype
    assert abs(g.weight_bytes - cpu.weight_bytes) <= 0.01 * cpu.weight_bytes  # the file's blocks, not float16
    ids = cpu.tokenizer.encode(PROMPTS[0] + " there was a little girl who lived in a village near the forest.")
    ref = cpu.logits(ids)
    err = np.abs(g.logits(ids) - ref).max() / np.abs(ref).max()
    print(f"SmolLM2 {qtype} on the device: max |Δ logits| {err:.2e} of max|logit|")
    assert err < 1e-3
    for prompt in PROMPTS:
        ids = cpu.tokenizer.encode(prompt)
        want, gaps = _greedy_with_gaps(cpu, ids, 24)
        n = next((i for i, gap in enumerate(gaps) if gap <= 1e-3), len(gaps))  # equal up to a near-tie
        assert g.decode_greedy(ids, g.new_cache(64), 24)[:n] == want[:n], (prompt, n)
        g.persistent = not g.persistent  # the other launch scheme (persistent layers kernel / 5 a layer): same
        assert g.decode_greedy(ids, g.new_cache(64), 24)[:n] == want[:n], (prompt, n)
        g.persistent = not g.persistent
        got = g.generate(prompt, max_tokens=8, temperature=0)  # the streamed path runs too
        assert len(got.text()) > 0
