"""minirt: a minimal LLM runtime. GGUF and Hugging Face weights in numpy, decoded with Numba on the CPU.

    import minirt
    m = minirt.load("smollm2")
    for piece in m.generate("Once upon a time", max_tokens=50):
        print(piece, end="", flush=True)
    logits = m.logits(m.tokenizer.encode("Hello"))
"""
from __future__ import annotations

import os

# Numba's OpenMP workers spin for a while after each parallel region; by default long enough to take
# the cores from the BLAS calls of a prompt pass that follow. A short spin keeps decode latency and
# gives prefill ~1.5x (measured: 512-token SmolLM2 prefill 1.66 s → 1.11 s on 2 cores).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from . import jitcache  # noqa: E402  (before any kernel is defined: compiled kernels go to the user cache)

jitcache.install()

from . import modes  # noqa: F401  (registers how generate runs each mode)
from .chat import Chat
from .errors import MinirtError
from .kvcache import kv_dtype
from .model import Model, warm_kernels
from .sampling import SamplingParams

__version__ = "0.1.0"


def load(model: str | os.PathLike = "smollm2", cache_dir: str | os.PathLike | None = None,
         threads: int | None = None, dequantize: bool = False, exact: bool = False, device: str = "cpu",
         ctx: int | None = None, kv_type: str = "f32", mode: str = "dense", **mode_options) -> Model:
    """Load a model by registry name (fetched and cached on first use) or from a local path, with its mode.

    Quantized matrices (Q8_0, Q4_0, Q4_1, F16, BF16) stay in their stored format and run on kernels
    made for it; dequantize=True expands them to float32 instead. Decode steps on block formats round
    activations to int8 per block (as llama.cpp does); exact=True keeps them float32.
    device: "cpu", "cuda" (the GPU backend, minirt.cuda.backend: Q8_0/Q4_0/Q4_1 blocks as stored, other matrices as float16) or "auto".
    ctx: the context used (what new caches and generations hold): default min(4096, the model's trained
    maximum); more is asked for here, up to that maximum (above it is a MinirtError, before the model is built).
    kv_type: how the KV cache stores keys and values: "f32" (exact) or "f16" (half the memory and reading,
    llama.cpp's default; each key and value rounded to the nearest float16). CPU only.
    mode: dense, lowrank, pinv, speculative or jacobi, with that mode's options (minirt.modes lists them):
        minirt.load("smollm2", mode="lowrank", energy=0.9)        # factored on load (or an export as it is)
        minirt.load("smollm2", mode="speculative", draft="ngram", draft_k=4)
    The model remembers its mode: model.generate(prompt) decodes in it (generate(mode=...) overrides).
    Options are checked before anything is loaded or downloaded."""
    from .modes import check, compose, remember
    from .readers import read_checkpoint
    from .registry import resolve
    options = check(mode, mode_options, device)  # one line, before any loading or downloading
    kv_dtype(kv_type)
    if device != "cpu":
        from .cuda.backend import resolve_device
        device = resolve_device(device)  # fails with one line before any loading
        if device == "cuda":  # "auto" found a GPU
            check(mode, mode_options, device)
            if kv_type != "f32":
                raise MinirtError(f"the GPU backend keeps its KV cache in float32: leave out kv_type={kv_type!r} "
                                  "(--kv-type) or run on the CPU")
    if threads is not None:
        set_threads(threads)
    ck = read_checkpoint(resolve(model, cache_dir))
    # the kernels first, while no weight is resident (peak memory: see warm_kernels)
    kernels = warm_kernels(ck, dequantize, exact, kv_type) if device == "cpu" else 0.0
    m = Model.from_checkpoint(ck, dequantize=dequantize, exact=exact, ctx=ctx, kv_type=kv_type)
    m.kernel_seconds = kernels  # part of the warm-up, not of loading the weights (what the CLI reports)
    del ck
    m = compose(m, mode, options, given=mode_options)
    if device == "cuda":
        from .cuda.backend import to_gpu
        return remember(to_gpu(m), mode, options)
    return m


def set_threads(n: int) -> None:
    """Number of threads the CPU kernels use (Numba) and BLAS uses for batched matmuls."""
    import numba
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise MinirtError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {n}")
    numba.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
    except ImportError:
        pass


__all__ = ["load", "Chat", "Model", "MinirtError", "SamplingParams", "set_threads", "__version__"]
