"""A decoder layer's one-token step as one C call (model/kernels/layer_step.c), over the layer's own tensors.

With the products at memory speed, a decode step's remaining cost was the forty-odd small
PyTorch ops per layer around them; the C step runs the same arithmetic (float32 activations,
layer norms, attention over the filled cache, exact GELU, residuals) between the same
products, over a float32, bfloat16 or int8 cache. `FusedLayer.of` says None where it does not
apply (a GPU, biases, another activation, kernels unavailable, widths that are not whole
64-blocks, int4 without integer dot products), and the layer then runs its eager code. The
weights are the layer's own: nothing is copied.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from model.decode import cross_fold
from model.decode.decoder import CrossKV, KVCache
from model.kernels import gemv
from model.decode.quant import Bf16Linear, Int4Linear, Int8Linear

F32, BF16, I8, I8_VNNI, I4 = 0, 1, 2, 3, 4  # kernels.h
# kernels.h MB_KV_*: the self-attention caches the C step reads, and folded cross-attention's vectors
KV_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
_P, _I = ctypes.c_void_p, ctypes.c_int


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _I), ("w", _P), ("scale", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("rows", _I), ("d", _I), ("heads", _I), ("ffn", _I), ("max_len", _I), ("cross_len", _I),
                ("eps", ctypes.c_float),
                ("ln_self_w", _P), ("ln_self_b", _P), ("ln_cross_w", _P), ("ln_cross_b", _P),
                ("ln_ff_w", _P), ("ln_ff_b", _P),
                ("qkv", _Linear), ("out", _Linear), ("cross_q", _Linear), ("cross_out", _Linear),
                ("fc1", _Linear), ("fc2", _Linear), ("kv", _I)]


class _Group(ctypes.Structure):
    """layer_step.c's mb_group: one decode state's rows in a step."""
    _fields_ = [("rows", _I), ("pos", _I), ("max_len", _I), ("cross_len", _I), ("k", _P), ("v", _P), ("ks", _P),
                ("vs", _P), ("cache_layer", ctypes.c_size_t), ("ck", _P), ("cv", _P), ("cross_layer", ctypes.c_size_t),
                ("cmask", _P), ("fm", _P), ("fu", _P), ("fms", _P), ("fus", _P), ("ffmt", _I),
                ("f_layer", ctypes.c_size_t), ("slot", _P)]


@dataclass(frozen=True)
class StepRows:
    """One decode state's share of a step: its input embeddings (rows, 1, d) at position `start`
    over its own cache and conditioning."""

    x: torch.Tensor
    start: int
    cache: KVCache
    cross: CrossKV | None


def _linear(mod: nn.Module) -> _Linear | None:
    """The C view of one linear, or None where the C step cannot run it."""

    if getattr(mod, "bias", None) is not None:
        return None
    if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and gemv.takes(mod.in_features):
        return _Linear(F32, mod.weight.data_ptr(), None)
    if isinstance(mod, Bf16Linear) and mod.kernel:
        return _Linear(BF16, mod.weight.data_ptr(), None)
    if isinstance(mod, Int8Linear) and mod.arithmetic:
        kind = I8_VNNI if mod.arithmetic == "vnni" else I8
        return _Linear(kind, mod.weight.data_ptr(), mod.scale.data_ptr())
    if isinstance(mod, Int4Linear) and mod.kernel:
        return _Linear(I4, mod.weight.data_ptr(), None)
    return None


def _norm(ln: nn.LayerNorm) -> tuple[int, int] | None:
    if ln.weight is None or ln.bias is None or ln.weight.dtype != torch.float32:
        return None
    return ln.weight.data_ptr(), ln.bias.data_ptr()


def _check(start: int, rows: int, cache, cross) -> None:
    """The C step writes column `start` of the cache and reads `rows` rows: both must exist."""
    if not 0 <= start < cache.max_len or cache.k.shape[1] != rows or (
            cross is not None and cross.k.shape[1] != rows):
        raise IndexError(f"decode step at position {start} of a cache of {cache.max_len} "
                         f"({cache.k.shape[1]} rows) with {rows} rows of input")


def _scales(cache, layer: int | None = None) -> tuple[int | None, int | None]:
    """Pointers to an int8 cache's key and value scales (of one layer, or of all), else None."""
    if not cache.quantized:
        return None, None
    ks, vs = (cache.k_scale, cache.v_scale) if layer is None else (cache.k_scale[layer], cache.v_scale[layer])
    return ks.data_ptr(), vs.data_ptr()


class FusedLayer:
    """One DecoderLayer's tensors laid out for `mb_layer_step`; call it as the layer's n == 1 step."""

    def __init__(self, spec, struct: _Layer, keep: list):
        self.spec = spec
        self.struct = struct
        self._keep = keep  # the tensors behind the pointers stay alive as long as this does

    @classmethod
    def of(cls, layer: nn.Module) -> FusedLayer | None:
        spec = layer.spec
        if not gemv.available() or spec.activation != "gelu" or spec.d_model % spec.n_heads:
            return None
        if layer.ln_self.weight.device.type != "cpu":
            return None
        names = ["qkv", "out", "fc1", "fc2"] + (["cross_q", "cross_out"] if spec.cross_attention else [])
        linears = {n: _linear(getattr(layer, n)) for n in names}
        norms = {n: _norm(getattr(layer, n)) for n in
                 ["ln_self", "ln_ff"] + (["ln_cross"] if spec.cross_attention else [])}
        if any(v is None for v in (*linears.values(), *norms.values())):
            return None
        eps = {layer.ln_self.eps, layer.ln_ff.eps} | ({layer.ln_cross.eps} if spec.cross_attention else set())
        if len(eps) != 1:
            return None
        s = _Layer(0, spec.d_model, spec.n_heads, spec.ffn, 0, 0, eps.pop())
        s.ln_self_w, s.ln_self_b = norms["ln_self"]
        s.ln_ff_w, s.ln_ff_b = norms["ln_ff"]
        if spec.cross_attention:
            s.ln_cross_w, s.ln_cross_b = norms["ln_cross"]
        for n, lin in linears.items():
            setattr(s, n, lin)
        tensors = [*layer.parameters(), *layer.buffers()]
        return cls(spec, s, tensors)

    def suits(self, x: torch.Tensor, cache, cross) -> bool:
        if x.dtype != torch.float32 or x.device.type != "cpu" or cache.k.dtype not in KV_FORMATS:
            return False
        if not (cache.k.is_contiguous() and cache.v.is_contiguous()):  # the C step walks them by offsets
            return False
        if cross is not None and not (cross.k.is_contiguous() and cross.v.is_contiguous()):
            return False
        if cross is None:
            return not self.spec.cross_attention
        return self.spec.cross_attention and cross.k.dtype == torch.float32 and cross.mask.dtype == torch.bool

    def __call__(self, x: torch.Tensor, layer: int, start: int, cache, cross) -> torch.Tensor:
        """x (rows, 1, d) at position `start` -> the layer's output; writes the cache column."""
        rows = x.shape[0]
        _check(start, rows, cache, cross)
        out = x.contiguous().clone()
        s = self.struct
        s.rows, s.max_len, s.kv = out.shape[0], cache.max_len, KV_FORMATS[cache.k.dtype]
        k, v = cache.k[layer], cache.v[layer]
        ks, vs = _scales(cache, layer)
        if cross is not None:
            ck, cv = cross.k[layer], cross.v[layer]
            s.cross_len = ck.shape[2]
            mask = cross.mask.contiguous()
            rc = gemv._lib.mb_layer_step(ctypes.byref(s), out.data_ptr(), k.data_ptr(), v.data_ptr(), ks, vs, start,
                                         ck.data_ptr(), cv.data_ptr(), mask.data_ptr())
        else:
            s.cross_len = 0
            rc = gemv._lib.mb_layer_step(ctypes.byref(s), out.data_ptr(), k.data_ptr(), v.data_ptr(), ks, vs, start,
                                         None, None, None)
        if rc != 0:
            raise MemoryError("the fused decoder layer step could not get its scratch memory")
        return out


class FusedStack:
    """Every layer's C step, the final layer norm and the heads in one call (`mb_decoder_steps`):
    the n == 1 step of a decoder whose layers all fused. Why: the Python around 24 separate calls
    (module calls, checks, views, ctypes) cost about as much as all the layer norms it wrapped."""

    def __init__(self, layers: list[FusedLayer], ln: tuple[int, int], heads: _Linear, heads_n: int, keep: list,
                 modules: nn.ModuleList):
        self.first = layers[0]
        self.modules = modules  # the layers themselves: cross-attention folds their projections
        # Cross-attention reads folded keys and values (model/decode/cross_fold.py) in this format where
        # they are less to read than the projections; None: always the projections.
        self.fold_dtype: torch.dtype | None = torch.float32 if cross_fold.enabled() else None
        self.array = (_Layer * len(layers))(*[f.struct for f in layers])
        self.n_layers = len(layers)
        self.ln = ln
        self.heads, self.heads_n = heads, heads_n
        self._keep = keep

    @classmethod
    def of(cls, lm: nn.Module) -> FusedStack | None:
        fused = [layer.fused for layer in lm.layers]
        if not fused or any(f is None for f in fused):
            return None
        heads, ln = _linear(lm.heads), _norm(lm.ln_final)
        if heads is None or ln is None or ctypes.c_float(lm.ln_final.eps).value != fused[0].struct.eps:
            return None
        return cls(fused, ln, heads, lm.heads.out_features,
                   [*lm.ln_final.parameters(), *lm.heads.parameters(), *lm.heads.buffers()], lm.layers)

    def suits(self, x: torch.Tensor, cache, cross) -> bool:
        return self.first.suits(x, cache, cross)

    def __call__(self, x: torch.Tensor, start: int, cache, cross) -> torch.Tensor:
        """x (rows, 1, d) input embeddings at position `start` -> logits (rows, 1, heads_n);
        writes every layer's cache column."""
        return self.together([StepRows(x, start, cache, cross)])

    def together(self, parts: list[StepRows]) -> torch.Tensor:
        """Several decode states' steps in one call -> logits (all their rows in order, 1, heads_n).
        Each part's cache and conditioning are its own; the weights are read once for all of them,
        and a part's logits are bit for bit what it gets alone (`mb_decoder_steps`)."""
        kv = {p.cache.k.dtype for p in parts}
        if len(kv) != 1:
            raise ValueError(f"a shared step needs one cache format, got {sorted(map(str, kv))}")
        groups = (_Group * len(parts))()
        keep: list[torch.Tensor] = []
        for g, p in zip(groups, parts):
            self._group(g, p, keep)
        h = torch.cat([p.x.reshape(-1, p.x.shape[-1]) for p in parts]).contiguous()
        logits = torch.empty(h.shape[0], 1, self.heads_n)
        rc = gemv._lib.mb_decoder_steps(self.array, self.n_layers, KV_FORMATS[kv.pop()], groups, len(parts),
                                        h.data_ptr(), self.ln[0], self.ln[1], ctypes.byref(self.heads), self.heads_n,
                                        logits.data_ptr())
        if rc != 0:
            raise MemoryError("the fused decoder step could not get its scratch memory")
        return logits

    def _group(self, g: _Group, p: StepRows, keep: list) -> None:
        """Fill one mb_group (layer_step.c) from a part; `keep` holds what the pointers need alive."""
        rows = p.x.shape[0]
        _check(p.start, rows, p.cache, p.cross)
        cache, cross = p.cache, p.cross
        g.rows, g.pos, g.max_len = rows, p.start, cache.max_len
        g.k, g.v, g.cache_layer = cache.k.data_ptr(), cache.v.data_ptr(), cache.k[0].numel()
        g.ks, g.vs = _scales(cache)
        if cross is None:
            return
        mask = cross.mask.contiguous()
        keep.append(mask)
        g.cross_len, g.cmask = cross.k.shape[3], mask.data_ptr()
        g.ck, g.cv, g.cross_layer = cross.k.data_ptr(), cross.v.data_ptr(), cross.k[0].numel()
        f = self._folded(cross)
        if f is not None:
            g.fm, g.fu, g.fms, g.fus = f.m.data_ptr(), f.u.data_ptr(), gemv._ptr(f.m_scale), gemv._ptr(f.u_scale)
            g.ffmt, g.f_layer, g.slot = KV_FORMATS[f.m.dtype], f.m[0].numel(), f.slot.data_ptr()

    def _folded(self, cross):
        if cross is None or self.fold_dtype is None:
            return None
        return cross_fold.folded(self.modules, cross, self.fold_dtype)
