"""Low-rank mode: weight matrices replaced by truncated-SVD factors, y = (x · Vᵀ) · Uᵀ.

W (n × m) = U Σ Vᵀ; keeping the r largest singular values gives U_r Σ_r (n × r) and V_r (r × m), read
r·(n + m) values per token instead of n·m. The rank comes from an energy threshold E (the smallest r with
Σ_{i<r} σ_i² ≥ E · Σ σ²), a given rank, or a parameter ratio P (r = ⌊P·n·m / (n + m)⌋ per matrix); a matrix
whose factors would not be smaller stays as it is (the break-even rule).

Activation-aware factors (SVD-LLM): with the Gram matrix G = XᵀX of the inputs a matrix sees on calibration
text and its Cholesky factor S (G + λ·mean(diag G)·I = S Sᵀ), W·S is factored instead of W and the factors
mapped back, W ≈ U_r Σ_r (V_rᵀ S⁻¹): the truncation error is then measured on real activations
(‖(W − W_r)Xᵀ‖_F = ‖(W − W_r)S‖_F), and "energy" is the share of that output energy kept.

An export (`minirt svd`) is a folder: model.gguf (the source's metadata and unfactored tensors, plus
blk.N.{qkv,wo,up,down}.lr_u / .lr_v factor tensors and the manifest under minirt.lowrank.manifest) and
lowrank.json (the same manifest). `--model FOLDER` loads it like any other model.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MinirtError
from ..progress import Progress
from ..linear import Dense, Linear, Quant, make_linear
from ..readers.base import Tensor

SITES = ("qkv", "wo", "up", "down")  # the Linears of a layer, by the name of the attribute
STORAGE = ("F32", "F16", "Q8_0")
DAMPING = 1e-3  # λ: ridge added to the calibration Gram, relative to its mean diagonal
MANIFEST = "lowrank.json"


def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest r whose leading singular values keep at least `energy` of Σσ²."""
    e = np.cumsum(s.astype(np.float64) ** 2)
    return int(np.searchsorted(e, energy * e[-1] * (1 - 1e-12)) + 1)


def check_choice(energy=None, rank=None, params=None) -> None:
    """Exactly one way of choosing ranks, each within its range."""
    if sum(x is not None for x in (energy, rank, params)) != 1:
        raise MinirtError("give exactly one of --energy E, --rank R and --params P")
    if energy is not None and not 0 < energy <= 1:
        raise MinirtError(f"energy must be in (0, 1], got {energy}")
    if params is not None and not 0 < params <= 1:
        raise MinirtError(f"params ratio must be in (0, 1], got {params}")
    if rank is not None and rank < 1:
        raise MinirtError(f"rank must be ≥ 1, got {rank}")


class SVD:
    """The singular value decomposition of W (or of W·S, activation-aware), kept so that factors of any
    rank can be cut from it without decomposing again."""

    def __init__(self, w: np.ndarray, gram: np.ndarray | None = None, damping: float = DAMPING):
        w = np.asarray(w, dtype=np.float64)
        self.shape = w.shape
        if gram is None:
            u, self.s, self.vt = np.linalg.svd(w, full_matrices=False)
        else:
            g = np.asarray(gram, np.float64)
            lam = damping * max(float(np.mean(np.diag(g))), 1e-30)
            S = np.linalg.cholesky(g + lam * np.eye(len(g)))
            u, self.s, vt = np.linalg.svd(w @ S, full_matrices=False)
            self.vt = np.linalg.solve(S.T, vt.T).T  # V_rᵀ S⁻¹ for every r at once (S is lower triangular)
        self.us, self.vt = (u * self.s).astype(np.float32), self.vt.astype(np.float32)  # float32 halves the memory
        self.cum = np.cumsum(self.s ** 2)

    def rank(self, energy=None, rank=None, params=None, multiple: int = 1) -> int:
        n, m = self.shape
        if energy is not None:
            r = rank_for_energy(self.s, energy)
        elif rank is not None:
            if rank > min(n, m):
                raise MinirtError(f"rank {rank} is larger than min(n, m) = {min(n, m)} of a {n}×{m} matrix")
            r = rank
        else:
            r = max(1, int(params * n * m / (n + m)))
        return min(-(-r // multiple) * multiple, min(n, m))

    def energy(self, r: int) -> float:
        return float(self.cum[r - 1] / self.cum[-1])

    def factors(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(U_r Σ_r, V_r) as float32, n × r and r × m."""
        return (np.ascontiguousarray(self.us[:, :r], np.float32), np.ascontiguousarray(self.vt[:r], np.float32))


def factor(w: np.ndarray, energy: float | None = None, rank: int | None = None):
    """(U_r Σ_r, V_r, energy kept) of a float matrix, by energy threshold or by rank."""
    if (energy is None) == (rank is None):
        raise MinirtError("give exactly one of energy and rank")
    check_choice(energy=energy, rank=rank)
    d = SVD(w)
    r = d.rank(energy=energy, rank=rank)
    return (*d.factors(r), d.energy(r))


class LowRank(Linear):
    """y = (x · Vᵀ) · Uᵀ (+ bias): two thin matmuls, W never materialised. U and V are Linears themselves
    (float32, or kept in F16/Q8_0 and run on the quantized kernels)."""

    def __init__(self, u, v, bias: np.ndarray | None = None, energy: float = 1.0):
        self.u = u if isinstance(u, Linear) else Dense(u)
        self.v = v if isinstance(v, Linear) else Dense(v)
        self.out_features, self.rank = self.u.out_features, self.v.out_features
        self.in_features = self.v.in_features
        self.bias = bias
        self.energy = energy
        self._mid: dict[int, np.ndarray] = {}

    def forward(self, x, out):
        T = x.shape[0]
        mid = self._mid.get(T)
        if mid is None:
            mid = self._mid[T] = np.empty((T, self.rank), np.float32)
        self.u.forward(self.v.forward(x, mid), out)
        if self.bias is not None:
            out += self.bias
        return out

    @property
    def nbytes(self) -> int:
        return self.u.nbytes + self.v.nbytes + (0 if self.bias is None else self.bias.nbytes)


def dense_matrix(lin: Linear) -> np.ndarray:
    if isinstance(lin, Dense):
        return lin.w
    if isinstance(lin, Quant) or hasattr(lin, "dequantized"):  # Quant, KQuant, Stacked (mixed formats)
        return lin.dequantized()
    raise MinirtError(f"cannot factor a {type(lin).__name__}")


@dataclass
class Factored:
    name: str
    shape: tuple[int, int]
    rank: int           # 0: kept as it was (factoring would not save anything)
    energy: float


def store(a: np.ndarray, storage: str) -> Tensor:
    """A float32 factor as a Tensor in the storage format (what an export writes and a load reads)."""
    if storage == "F32":
        return Tensor(a, "F32", a.shape)
    if storage == "F16":
        return Tensor(a.astype(np.float16), "F16", a.shape)
    from gguf import GGMLQuantizationType, quants
    return Tensor(quants.quantize(a, GGMLQuantizationType[storage]), storage, a.shape)


def lowrank_from_tensors(u: Tensor, v: Tensor, bias, exact: bool = False, energy: float = 1.0) -> LowRank:
    return LowRank(make_linear([u], exact=exact), make_linear([v], exact=exact), bias, energy)


def factored_linear(d: SVD, lin: Linear, name: str, r: int, storage: str = "F32", force: bool = False):
    """(the Linear at rank r, its Factored record), or (lin as it was, rank 0) where factors of rank r would
    be no smaller than the matrix (the break-even rule) and force is off."""
    n, m = d.shape
    if r * (n + m) >= n * m and not force:
        return lin, Factored(name, (n, m), 0, 1.0)
    u, v = d.factors(r)
    if storage == "F32":
        new = LowRank(u, v, lin.bias, d.energy(r))
    else:
        new = lowrank_from_tensors(store(u, storage), store(v, storage), lin.bias, getattr(lin, "exact", False),
                                   d.energy(r))
    return new, Factored(name, (n, m), r, d.energy(r))


class Factorizer:
    """Decomposes every attention and MLP matrix of a model once (plain, or activation-aware from
    calibration Grams) and builds low-rank copies of the model at any energy, rank or parameter ratio."""

    def __init__(self, model, grams: dict | None = None, head: bool = False, progress: bool = False):
        self.model, self.grams, self.head = model, grams, head
        self.svd: dict[str, SVD] = {}
        names = [(f"layers.{i}.{a}", getattr(L, a)) for i, L in enumerate(model.layers) for a in SITES]
        if head:
            names.append(("head", model.head))
        bar = Progress("svd: decomposing", len(names), "matrices") if progress else None
        for name, lin in names:
            self.svd[name] = SVD(dense_matrix(lin), None if grams is None else grams.get(name))
            if bar:
                bar.update(1, note=name)
        if bar:
            bar.close()

    def build(self, energy=None, rank=None, params=None, storage: str = "F32", force: bool = False):
        """A copy of the model with factored Linears; model.lowrank lists rank and energy per matrix."""
        check_choice(energy, rank, params)
        if storage not in STORAGE:
            raise MinirtError(f"unknown factor storage {storage!r}: choose one of {', '.join(STORAGE)}")
        multiple = 32 if storage == "Q8_0" else 1  # block formats: the rank is rounded up to whole blocks
        src = self.model
        out = copy.copy(src)
        out.layers, report = [], []

        def replace(name, lin):
            d = self.svd[name]
            new, f = factored_linear(d, lin, name, d.rank(energy, rank, params, multiple), storage, force)
            report.append(f)
            return new

        for i, L in enumerate(src.layers):
            L2 = copy.copy(L)
            for a in SITES:
                setattr(L2, a, replace(f"layers.{i}.{a}", getattr(L, a)))
            out.layers.append(L2)
        if self.head:  # a tied embedding table keeps serving lookups from the unfactored matrix
            out.head = replace("head", src.head)
        out._scratch = {}
        out.lowrank = report
        out.lowrank_info = dict(method="svd" if self.grams is None else "svd-llm", energy=energy, rank=rank,
                                params=params, storage=storage, head=self.head)
        return out


def with_lowrank(model, energy: float | None = None, rank: int | None = None, params: float | None = None,
                 calibration=None, storage: str = "F32", head: bool = False, force: bool = False,
                 progress: bool = False):
    """A copy of the model whose attention and MLP matrices (and the head, if head=True) are replaced by
    low-rank factors. calibration: token ids (or a dict of Gram matrices) for activation-aware factors.
    Returns the model; model.lowrank lists what was done per matrix."""
    if energy is None and rank is None and params is None:
        raise MinirtError("low-rank mode needs --energy E, --rank R or --params P")
    check_choice(energy, rank, params)
    if rank is not None:  # before any decomposition: a rank no matrix can have is a typo, not a request
        limit = min(min(getattr(L, a).out_features, getattr(L, a).in_features) for L in model.layers for a in SITES)
        if rank > limit:
            raise MinirtError(f"rank {rank} is larger than min(n, m) = {limit} of the model's smallest matrix")
    grams = calibration
    if calibration is not None and not isinstance(calibration, dict):
        grams = calibration_grams(model, calibration, progress=progress)
    return Factorizer(model, grams, head, progress).build(energy, rank, params, storage, force)


# ---- calibration --------------------------------------------------------------------------------
class _Recorder(Linear):
    """Wraps a Linear and adds xᵀx of everything it sees to a Gram matrix (float64)."""

    def __init__(self, lin: Linear, gram: np.ndarray):
        self.lin, self.gram = lin, gram
        self.in_features, self.out_features, self.bias = lin.in_features, lin.out_features, None

    def forward(self, x, out):
        xd = x.astype(np.float64)
        self.gram += xd.T @ xd
        return self.lin.forward(x, out)


def calibration_grams(model, ids, ctx: int = 512, progress: bool = False) -> dict[str, np.ndarray]:
    """Gram matrices XᵀX of the inputs of every layer matrix (and of the head) over calibration tokens,
    run in windows of ctx positions through the unfactored model."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) < 2:
        raise MinirtError("the calibration text gives fewer than 2 tokens")
    rec = copy.copy(model)
    rec.layers, grams = [], {}
    for i, L in enumerate(model.layers):
        L2 = copy.copy(L)
        for a in SITES:
            lin = getattr(L, a)
            g = grams[f"layers.{i}.{a}"] = np.zeros((lin.in_features, lin.in_features))
            setattr(L2, a, _Recorder(lin, g))
        rec.layers.append(L2)
    g = grams["head"] = np.zeros((model.head.in_features,) * 2)
    rec.head = _Recorder(model.head, g)
    rec._scratch = {}
    ctx = min(ctx, model.cfg.max_ctx)
    starts = range(0, len(ids), ctx)
    bar = Progress("calibration", len(starts), "windows") if progress else None
    for a in starts:
        rec.forward(ids[a:a + ctx], rec.new_cache(ctx), logits="all")
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return grams


def calibration_tokens(model, text: str, max_tokens: int = 4096, label: str = "the calibration text") -> np.ndarray:
    """The first max_tokens tokens of a calibration text (no BOS), at least 2."""
    ids = model.tokenizer.encode(text, add_bos=False)[:max_tokens]
    if len(ids) < 2:
        raise MinirtError(f"{label} gives fewer than 2 tokens")
    return np.asarray(ids, np.int64)


# ---- export and load ----------------------------------------------------------------------------
GGUF_SOURCES = {  # which tensors of the source GGUF a factored Linear replaces
    "qkv": ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_qkv.weight"),
    "wo": ("attn_output.weight",),
    "up": ("ffn_gate.weight", "ffn_up.weight"),
    "down": ("ffn_down.weight",),
}


def manifest(model) -> dict:
    info = dict(getattr(model, "lowrank_info", {}))
    info["matrices"] = [dict(name=f.name, shape=list(f.shape), rank=f.rank, energy=round(f.energy, 6))
                        for f in model.lowrank]
    return info


def check_out(out_dir) -> Path:
    """The export folder: must not exist, or be an empty folder (checked before any work is done)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MinirtError(f"{out} exists and is not an empty folder; choose another --out")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MinirtError(f"cannot write {out}: {parent} is not a folder")
            break
    return out


def export(model, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Write a factored model (from with_lowrank) as an export folder: model.gguf + lowrank.json.
    The unfactored tensors and all metadata come from the model's source GGUF, byte for byte."""
    import gguf

    from ..quantize import copy_metadata, copy_tensor
    src = Path(model.source) if model.source else None
    if src is None or src.is_dir() or not getattr(model, "lowrank", None):
        raise MinirtError("svd export needs a factored model loaded from a GGUF file "
                          "(a Hugging Face folder: convert it first with `minirt convert FOLDER model.gguf`)")
    out = check_out(out_dir)
    storage = model.lowrank_info["storage"]
    sites = list(_factored_sites(model))
    skip = {t for _, _, replaced in sites for t in replaced}
    reader = gguf.GGUFReader(str(src), "r")
    arch = reader.fields["general.architecture"].contents()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".part-"))
    except OSError as e:
        raise MinirtError(f"cannot write {out}: {e.strerror}") from None
    try:
        writer = gguf.GGUFWriter(str(tmp_dir / "model.gguf"), arch)
        copy_metadata(reader, writer)
        info = manifest(model)
        writer.add_string("minirt.lowrank.manifest", json.dumps(info))
        for t in reader.tensors:
            if t.name not in skip:
                copy_tensor(writer, t)
        bar = Progress("export: writing factors", len(sites), "matrices") if progress else None
        for gname, lin, _ in sites:
            for part, sub in (("lr_u", lin.u), ("lr_v", lin.v)):
                if storage == "Q8_0":  # the blocks exactly as they ran (no second rounding)
                    t = _raw_blocks(sub)
                else:
                    t = store(sub.w if storage == "F32" else dense_matrix(sub), storage)
                raw = None if storage != "Q8_0" else gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(f"{gname}.{part}", t.data, raw_shape=None if raw else t.data.shape, raw_dtype=raw)
            if lin.bias is not None:
                writer.add_tensor(f"{gname}.lr_b", np.asarray(lin.bias, np.float32))
            if bar:
                bar.update(1, note=gname)
        if bar:
            bar.close()
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (tmp_dir / MANIFEST).write_text(json.dumps(dict(info, source=src.name), indent=1) + "\n")
        tmp_dir.chmod(0o755)  # mkdtemp's folders are private
        if out.exists():
            out.rmdir()
        os.replace(tmp_dir, out)
    except BaseException as e:
        import shutil
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(e, (OSError, ValueError)):
            raise MinirtError(f"writing {out} failed: {e}") from None
        raise
    return out


def _factored_sites(model):
    """(GGUF name prefix, LowRank, source tensors it replaces) for every factored matrix of a model."""
    for f in model.lowrank:
        if not f.rank:
            continue
        if f.name == "head":
            yield "output", model.head, ("output.weight",)
        else:
            _, i, site = f.name.split(".")
            yield (f"blk.{i}.{site}", getattr(model.layers[int(i)], site),
                   tuple(f"blk.{i}.{t}" for t in GGUF_SOURCES[site]))


def _raw_blocks(q: Quant) -> Tensor:
    """A Q8_0 Quant back in GGUF's block layout (scale, then 32 int8 quants, per block)."""
    N, nb = q.d.shape
    qs = q.q.view(np.int8).reshape(N, 32, nb).transpose(0, 2, 1)  # undo the block transposition
    blocks = np.empty((N, nb, 34), np.uint8)
    blocks[:, :, 0:2] = q.d.reshape(N, nb, 1).view(np.uint8).reshape(N, nb, 2)
    blocks[:, :, 2:] = qs.view(np.uint8)
    return Tensor(blocks.reshape(N, nb * 34), "Q8_0", (N, nb * 32))


def describe_export(model, manifest_json: str) -> None:
    """model.lowrank / model.lowrank_info of a model loaded from an export, from its manifest."""
    info = json.loads(manifest_json)
    model.lowrank = [Factored(m["name"], tuple(m["shape"]), m["rank"], m["energy"]) for m in info.pop("matrices", [])]
    model.lowrank_info = info


def summary(model) -> str:
    """One line: how many matrices are factored, their ranks, and the bytes read per token."""
    layers = [f for f in model.lowrank if f.name != "head"]
    kept = [f.rank for f in layers if f.rank]
    s = f"low rank: {len(kept)} of {len(layers)} layer matrices factored"
    if kept:
        s += f", ranks {min(kept)}/{int(np.median(kept))}/{max(kept)} (min/median/max)"
    head = [f for f in model.lowrank if f.name == "head"]
    if head:  # the head (tied to the embeddings or not) is reported on its own
        s += (f"; head {head[0].shape[0]}×{head[0].shape[1]}: " +
              (f"rank {head[0].rank}, energy {head[0].energy:.3f}" if head[0].rank else "kept dense"))
    return s + f"; {model.weight_bytes / 2**20:.1f} MiB read per token"


def lowrank_linear(lin: Linear, name: str, energy=None, rank=None, force: bool = False):
    """One Linear factored on its own (tests and experiments): (new Linear, Factored)."""
    check_choice(energy, rank)
    d = SVD(dense_matrix(lin))
    return factored_linear(d, lin, name, d.rank(energy, None if rank is None else min(rank, *d.shape)), force=force)


__all__ = ["LowRank", "Factorizer", "with_lowrank", "export", "calibration_grams", "factor"]
