"""INT4 straight from a GGUF, one tensor at a time (no float copy of the model anywhere).

onnxruntime-genai's model builder makes the graph from a transformers model on the meta device
(shapes only) whose small float tensors (norm weights, q/k/v biases) are read from the GGUF; its
float graph is taken before it would quantize anything. Every MatMul with a constant weight then
becomes a MatMulNBits, and the embedding a GatherBlockQuantized, whose initializers are lazy:
``onnx_ir.save`` computes each one from its GGUF tensor(s), writes it and drops it before the next.

Each GGUF tensor keeps its own precision. 4-bit blocks (Q4_0, Q4_1, Q4_K) stay 4-bit, 5-8-bit
blocks (Q5_0, Q5_1, Q5_K, Q8_0) become exact 8-bit, and Q6_K's values are re-rounded onto 8-bit
blocks of 32 (within half an 8-bit step; see _plan); the float offsets of Q4_1/Q4_K/Q5_1/Q5_K
become residual rows over block sums (gguf_repack's correction). Tensors of types gguf_blocks
cannot decode (F16, BF16, F32, Q2_K, Q3_K, IQ*...) are quantized with onnxruntime's MLAS quantizer
(4-bit; 8-bit for undecoded 5-8-bit types). Anything this module cannot map raises ``Unsupported``: the caller then takes the
dequantizing path.
"""
from __future__ import annotations

import contextlib
import gc
import io
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .gguf_blocks import DECODERS, Blocks, decode_raw, read_raw
from .gguf_repack import _hf_modules, _pack, _stack, _to_matmulnbits, integer_part
from .progress import Bar, stage, ticking

# GGUF general.architecture values whose weights map onto the builder's graph: one to one, or
# (phi3) as row ranges of llama.cpp's fused attn_qkv (q|k|v, packed whole again by the builder) and
# ffn_up (gate|up, split into the builder's gate_proj and up_proj). Gemma's norm weights are read
# as transformers has them (w, llama.cpp stores 1 + w); the builder adds the 1 back.
STREAMING = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
_FOUR_BIT = {"Q4_0", "Q4_1", "Q4_K"}
_AFFINE = {"Q4_1", "Q4_K", "Q5_1", "Q5_K"}  # float offsets: residual rows
# symmetric types (offset == -2^(bits-1) * scale in their own width): their codes are shifted onto
# MatMulNBits' default zero point 2^(bits-1) of the width they are carried at, so they need no
# zero-point tensor (Q5_0 at 8 bits: codes + 112)
_CENTERED = {"Q4_0", "Q5_0", "Q6_K", "Q8_0"}
_WIDE = ("Q5", "Q6", "Q8")  # undecoded types that get 8 bits
_MLAS_ROWS = 16384  # output rows quantized by MLAS at a time
_CHUNK_ROWS = 16384  # rows of a big tensor decoded and packed at a time
_SMALL_E = 1 << 20  # bytes: block sums by a MatMul with a 0/1 matrix up to this size, else ReduceSum


# Q6_K's 6-bit codes have a scale per 16 values. Carried exactly, that is an 8-bit MatMulNBits
# with block 16 (10 bits per weight, and measured here 1.37x slower per step than block 32 at
# the same bytes). Instead its exact values are re-rounded onto symmetric 8-bit blocks of 32 by
# ONNX Runtime's MLAS quantizer (9 bits per weight): what llama.cpp's own Q8_0 of those values
# would be, an error of at most half an 8-bit step (1/254 of the block's largest value). (MLAS's
# symmetric 8-bit quantizer is not used: measured here, it errs by up to 0.95 of a step.)


class Unsupported(Exception):
    """This GGUF cannot be streamed (the message says why, in one line)."""


@dataclass
class Report:
    carried: dict[str, int] = field(default_factory=dict)  # GGUF type -> tensors kept exactly
    requantized: dict[str, int] = field(default_factory=dict)  # GGUF type -> tensors quantized by MLAS
    rerounded: dict[str, int] = field(default_factory=dict)  # GGUF type -> tensors whose values went 8-bit (Q6_K)
    corrected: int = 0  # MatMulNBits with residual rows
    representations: dict[str, dict[str, int]] = field(default_factory=dict)
    tensors: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, kind: str, how: str, method: str) -> None:
        self.tensors[name] = f"{kind} -> {how}"
        book = {"blocks": self.carried, "q8": self.rerounded, "mlas": self.requantized}[method]
        book[kind] = book.get(kind, 0) + 1
        per = self.representations.setdefault(kind, {})
        per[how] = per.get(how, 0) + 1

    def manifest(self) -> dict:
        d = {"carried": dict(sorted(self.carried.items())), "requantized": dict(sorted(self.requantized.items())),
             "rerounded_to_8bit": dict(sorted(self.rerounded.items())),
             "offset_corrections": self.corrected, "streamed": True,
             "representations": {k: dict(sorted(v.items())) for k, v in sorted(self.representations.items())}}
        if len(self.tensors) <= 64:
            d["tensors"] = dict(sorted(self.tensors.items()))
        return d


@dataclass
class _TensorInfo:
    """What gguf-py's ReaderTensor says about a tensor, without the data view."""
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple  # GGUF order: [K, N] for a matrix
    data_offset: int  # absolute, in the file
    n_bytes: int


def _tensor_table(path: Path, wanted: frozenset[str] = frozenset(), values: dict | None = None) -> dict[str, _TensorInfo]:
    """The GGUF's tensor table. gguf.GGUFReader parses every metadata value into numpy views
    (seconds for a 150k-token vocabulary); this skips them, except the scalar (number, string)
    values of the keys in ``wanted``, which go into ``values``."""
    import mmap
    import struct

    import gguf

    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise Unsupported(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version < 2:
            raise Unsupported(f"GGUF version {version} is too old")
        pos = 24

        def u32():
            nonlocal pos
            pos += 4
            return struct.unpack_from("<I", m, pos - 4)[0]

        def u64():
            nonlocal pos
            pos += 8
            return struct.unpack_from("<Q", m, pos - 8)[0]

        def string() -> bytes:
            nonlocal pos
            n = u64()
            pos += n
            return m[pos - n: pos]

        def skip(kind: int) -> None:
            nonlocal pos
            if kind in fixed:
                pos += fixed[kind]
            elif kind == 8:
                n = u64()
                pos += n
            elif kind == 9:
                inner, count = u32(), u64()
                if inner in fixed:
                    pos = pos + fixed[inner] * count
                else:
                    for _ in range(count):
                        skip(inner)
            else:
                raise Unsupported(f"unknown GGUF metadata type {kind}")

        alignment = 32
        scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
        for _ in range(n_kv):
            key = string()
            kind = u32()
            if key == b"general.alignment" and kind == 4:
                alignment = struct.unpack_from("<I", m, pos)[0]
            if values is not None and key.decode(errors="replace") in wanted:
                if kind in scalar:
                    values[key.decode()] = struct.unpack_from(scalar[kind], m, pos)[0]
                elif kind == 8:
                    n = struct.unpack_from("<Q", m, pos)[0]
                    values[key.decode()] = m[pos + 8: pos + 8 + n].decode(errors="replace")
            skip(kind)
        infos = []
        for _ in range(n_tensors):
            name = string().decode()
            dims = [u64() for _ in range(u32())]
            kind, offset = u32(), u64()
            infos.append((name, dims, kind, offset))
        start = -(-pos // alignment) * alignment
    table = {}
    for name, dims, kind, offset in infos:
        qtype = gguf.GGMLQuantizationType(kind)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        table[name] = _TensorInfo(name, qtype, tuple(dims), start + offset, int(np.prod(dims)) // block * size)
    return table


def _base(name: str) -> str:
    """The GGUF tensor's name, without the row range of a slice (``blk.0.ffn_up.weight[0:8192]``)."""
    return name.split("[", 1)[0]


class _Gguf:
    """GGUF tensors by HF parameter name (transformers' own name map and row permutation)."""

    def __init__(self, path: Path, arch_name: str, config: dict, meta_model):
        import gguf
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.path = path
        self.tensors = _tensor_table(path)
        self.processor = TENSOR_PROCESSORS.get(arch_name, TensorProcessor)(config=config)
        # transformers' get_gguf_hf_weights_map, for the top-level model only (it rebuilds
        # gguf-py's name map once per submodule: seconds)
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
        names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
        self.gguf_name = {}
        for hf_name in meta_model.state_dict():
            hf_name = self.processor.preprocess_name(hf_name)
            base, dot, suffix = hf_name.rpartition(".")
            if suffix in ("weight", "bias") and (g := names.get_name(base)) is not None:
                self.gguf_name[hf_name] = f"{g}.{suffix}"
        # fused HF matrices (Phi-3's qkv_proj and gate_up_proj, as llama.cpp's attn_qkv and
        # ffn_up) whose builder graph has the parts: part name -> (fused name, first row, rows)
        self.fused: dict[str, tuple[str, int, int]] = {}
        heads, hidden = config["num_attention_heads"], config["hidden_size"]
        head_dim = config.get("head_dim") or hidden // heads
        kv_heads = config.get("num_key_value_heads") or heads
        splits = {"self_attn.qkv_proj": [("self_attn.q_proj", heads * head_dim),
                                         ("self_attn.k_proj", kv_heads * head_dim),
                                         ("self_attn.v_proj", kv_heads * head_dim)],
                  "mlp.gate_up_proj": [("mlp.gate_proj", config["intermediate_size"]),
                                       ("mlp.up_proj", config["intermediate_size"])]}
        for hf_name in list(self.gguf_name):
            for fused, parts in splits.items():
                if hf_name.endswith(f".{fused}.weight"):
                    prefix, row = hf_name[: -len(f"{fused}.weight")], 0
                    for part, rows in parts:
                        self.fused[f"{prefix}{part}.weight"] = (hf_name, row, rows)
                        row += rows

    def tensor(self, hf_param: str):
        if hf_param not in self.gguf_name and hf_param in self.fused:  # rows of a fused tensor
            fused, row, rows = self.fused[hf_param]
            t = self.tensor(fused)
            if len(t.shape) != 2:
                raise Unsupported(f"{t.name} is not a matrix")
            k, n = (int(s) for s in t.shape)
            if row + rows > n or t.n_bytes % n:
                raise Unsupported(f"{t.name} is not [{row + rows}, ...] rows that hold {hf_param}")
            if self.permuted(t):
                raise Unsupported(f"{t.name}: rows of a permuted tensor")
            per_row = t.n_bytes // n
            return _TensorInfo(f"{t.name}[{row}:{row + rows}]", t.tensor_type, (k, rows),
                               t.data_offset + row * per_row, rows * per_row)
        name = self.gguf_name.get(hf_param)
        if name not in self.tensors and hf_param == "lm_head.weight":  # tied: the embedding
            name = self.gguf_name.get("model.embed_tokens.weight")
        if name not in self.tensors:
            raise Unsupported(f"no GGUF tensor holds {hf_param}")
        return self.tensors[name]

    def merged(self, parts: list) -> list:
        """``parts`` with consecutive row ranges of one GGUF tensor joined (the whole tensor when
        they cover it: q|k|v rows of attn_qkv packed again by the builder)."""
        out: list = []
        for t in parts:
            last = out[-1] if out else None
            if (last is not None and "[" in t.name and "[" in last.name and _base(t.name) == _base(last.name)
                    and last.data_offset + last.n_bytes == t.data_offset):
                lo = int(last.name.rsplit("[", 1)[1].split(":")[0])
                rows = int(last.shape[1]) + int(t.shape[1])
                out[-1] = _TensorInfo(f"{_base(t.name)}[{lo}:{lo + rows}]", t.tensor_type, (t.shape[0], rows),
                                      last.data_offset, last.n_bytes + t.n_bytes)
            else:
                out.append(t)
        for i, t in enumerate(out):
            whole = self.tensors.get(_base(t.name))
            if "[" in t.name and whole is not None and (whole.data_offset, whole.n_bytes) == (t.data_offset, t.n_bytes):
                out[i] = whole
        return out

    def _permute(self, t, a: np.ndarray) -> np.ndarray:
        n = a.shape[0]
        perm = np.asarray(self.processor.process(np.arange(n, dtype=np.int64).reshape(n, 1), _base(t.name)).weights)
        perm = perm.reshape(n)
        return a if np.array_equal(perm, np.arange(n)) else a[perm]

    def floats(self, t, rows: slice | None = None) -> np.ndarray:
        """Dequantized float32, shaped as transformers has it ([N, K] or [N]); or ``rows`` of a
        matrix whose rows are not permuted (see ``permuted``)."""
        from gguf.quants import dequantize

        if rows is not None:
            part = self._row_slice(t, rows)
            return np.asarray(dequantize(read_raw(self.path, part), t.tensor_type).reshape(-1, int(t.shape[0])),
                              np.float32)
        shape = tuple(int(s) for s in reversed(t.shape))
        a = dequantize(read_raw(self.path, t), t.tensor_type).reshape(shape).astype(np.float32)
        return self._permute(t, a) if a.ndim == 2 else np.asarray(self.processor.process(a, _base(t.name)).weights)

    def blocks(self, t, rows: slice | None = None) -> Blocks:
        """The tensor's blocks, or those of ``rows`` only (rows of a tensor whose rows are not
        permuted: see ``permuted``)."""
        k, n = (int(s) for s in t.shape)
        if rows is not None:
            part = self._row_slice(t, rows)
            return decode_raw(t.tensor_type.name, rows.stop - rows.start, k, read_raw(self.path, part), t.name,
                              check_rows=16)
        b = decode_raw(t.tensor_type.name, n, k, read_raw(self.path, t), t.name, check_rows=64)
        perm = self._permute(t, np.arange(n))
        return b if np.array_equal(perm, np.arange(n)) else b.rows(perm)

    def _row_slice(self, t, rows: slice) -> _TensorInfo:
        """The bytes of ``rows`` of a matrix whose rows are not permuted."""
        k, n = (int(s) for s in t.shape)
        if self.permuted(t):
            raise ValueError(f"{t.name}: row slices of a permuted tensor")
        per_row = int(t.n_bytes) // n
        return _TensorInfo(t.name, t.tensor_type, (k, rows.stop - rows.start),
                           int(t.data_offset) + rows.start * per_row, (rows.stop - rows.start) * per_row)

    def permuted(self, t) -> bool:
        n = int(t.shape[1]) if len(t.shape) == 2 else int(t.shape[0])
        return not np.array_equal(self._permute(t, np.arange(n)), np.arange(n))


@dataclass
class _Plan:
    """One MatMulNBits (or GatherBlockQuantized) over one or more GGUF tensors stacked along N."""
    parts: list  # GGUF reader tensors
    kinds: list[str]
    method: str  # "blocks" (the GGUF's own codes), "q8" (Q6_K's values re-rounded to 8 bits) or "mlas"
    bits: int
    block: int
    k: int
    n: int
    residual: bool
    zero_points: bool
    # lm_head: the float offsets' residuals as a float [K / block, N] table times the input's block
    # sums (exact) instead of residual rows (rounded to ``bits`` like the rest of the MatMulNBits)
    float_residual: bool = False

    @property
    def k_extra(self) -> int:
        nb = self.k // self.block
        return -(-nb // self.block) * self.block if self.residual and not self.float_residual else 0

    @property
    def blocks_total(self) -> int:
        return (self.k + self.k_extra) // self.block

    def describe(self, op: str = "MatMulNBits") -> str:
        extra = ", float offsets" if self.float_residual else ", offset rows" if self.residual else ""
        kinds = '/'.join(sorted(set(self.kinds)))
        src = "" if self.method == "blocks" else f", re-rounded from {kinds}" if self.method == "q8" \
            else f", MLAS from {kinds}"
        return f"{op} {self.bits}-bit b{self.block}{extra}{src}"


def _plan(parts: list, symmetric: bool, block_size: int, max_bits: int = 8) -> list[_Plan]:
    """One plan per group of parts that can share a MatMulNBits (same method, bits, block).
    ``max_bits=4`` (a speculative draft): every type wider than 4 bits is quantized again to 4
    bits by MLAS from its exact values, the 4-bit types keep their blocks."""
    plans: list[_Plan] = []
    for t in parts:
        kind = t.tensor_type.name
        if len(t.shape) != 2:
            raise Unsupported(f"{t.name} is not a matrix")
        k, n = (int(s) for s in t.shape)
        draft = max_bits == 4 and kind not in _FOUR_BIT  # quantized again to 4 bits below
        if kind == "Q6_K" and not draft:  # 16-value sub-blocks: re-rounded onto 8-bit blocks of 32 (see above)
            p = _Plan([t], [kind], "q8", 8, 32, k, n, False, False)
        elif kind in DECODERS and not draft:
            p = _Plan([t], [kind], "blocks", 4 if kind in _FOUR_BIT else 8, 32, k, n, kind in _AFFINE,
                      kind not in _CENTERED)
        else:
            bits = 8 if kind.startswith(_WIDE) and not draft else 4
            p = _Plan([t], [kind], "mlas", bits, block_size, k, n, False, not symmetric)
            if k % block_size:
                raise Unsupported(f"{t.name}: K={k} is not a multiple of the block size {block_size}")
        last = plans[-1] if plans else None
        if last and (last.method, last.bits, last.block, last.k) == (p.method, p.bits, p.block, p.k):
            last.parts.append(t)
            last.kinds.append(kind)
            last.n += n
            last.residual |= p.residual
            last.zero_points |= p.zero_points
        else:
            plans.append(p)
    return plans


def _q8(b: Blocks) -> dict[str, np.ndarray]:
    """``b``'s values on symmetric 8-bit blocks of 32 (round to nearest, the default zero point
    128, no zero-point tensor): MatMulNBits' B [N, K / 32, 32] and scales [N, K / 32]."""
    n, k = b.shape
    w = b.values().reshape(n, k // 32, 32)
    scale = np.abs(w).max(axis=-1) / 127
    q = np.rint(w / np.where(scale == 0, 1, scale)[..., None]) + 128
    return {"B": np.clip(q, 1, 255).astype(np.uint8), "scales": scale.astype(np.float32)}


def _recentred(b: Blocks, bits: int) -> Blocks:
    """``b`` (a symmetric type: offset == -c * scale with a whole c per block) with its codes
    shifted so that c becomes ``bits``' default zero point 2^(bits-1): the same values, and no
    zero-point tensor. Exact: codes are integers, the offsets are rebuilt from the scales."""
    half = 1 << (bits - 1)
    scale = b.scale
    safe = np.where(scale == 0, 1, scale)
    c = np.rint(-b.offset / safe)
    c[scale == 0] = half  # an all-zero block: any code gives 0
    if np.all(c == half):
        return b
    n, k = b.q.shape
    q = b.q.reshape(n, -1, b.block).astype(np.int16) + (half - c).astype(np.int16)[..., None]
    if q.min() < 0 or q.max() > (1 << bits) - 1:
        raise ValueError(f"codes do not fit {bits} bits around the default zero point")
    return Blocks(q.reshape(n, k).astype(np.uint8), scale, (-half * scale).astype(np.float32), b.block, bits)


class _Weights:
    """Computes a plan's packed arrays on demand, keeping only the last plan's (its B, scales and
    zero points are written one after the other)."""

    def __init__(self, gg: _Gguf, symmetric: bool):
        self.gg, self.symmetric = gg, symmetric
        self.key: int | None = None
        self.value: dict[str, np.ndarray] = {}

    def get(self, plan: _Plan, what: str, embedding: bool = False) -> np.ndarray:
        key = id(plan) * 2 + embedding
        if self.key != key:
            self.value = {}
            self.key = None
            self.value = self._embedding(plan) if embedding else self._matmul(plan)
            self.key = key
        return self.value[what]

    def _floats(self, plan: _Plan) -> np.ndarray:
        return np.concatenate([self.gg.floats(t) for t in plan.parts]) if len(plan.parts) > 1 else self.gg.floats(plan.parts[0])

    def _mlas(self, plan: _Plan, w: np.ndarray) -> dict[str, np.ndarray]:
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

        n, k = w.shape
        nb, blob = k // plan.block, plan.block * plan.bits // 8
        b = np.zeros((n, nb, blob), np.uint8)
        scales = np.zeros((n, nb), np.float32)
        zp = np.zeros((n, -(-nb * plan.bits // 8)), np.uint8)
        fn = quantize_matmul_8bits if plan.bits == 8 else quantize_matmul_4bits
        for r in range(0, n, _MLAS_ROWS):
            rows = slice(r, min(n, r + _MLAS_ROWS))
            m = rows.stop - rows.start
            pb, ps, pz = np.zeros((m, nb, blob), np.uint8), np.zeros((m, nb), np.float32), np.zeros((m, zp.shape[1]), np.uint8)
            fn(pb, np.ascontiguousarray(w[rows].T), ps, pz, plan.block, m, k, self.symmetric)
            b[rows], scales[rows], zp[rows] = pb, ps, pz
        return {"B": b, "scales": scales, "zp": zp}

    def _chunks(self, plan: _Plan, fn: Callable[[Blocks], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """``fn`` over the plan's stacked blocks; for a big single tensor, over slices of its rows
        (decoding a whole lm_head at once takes several copies of it)."""
        t = plan.parts[0]
        if len(plan.parts) > 1 or plan.n <= _CHUNK_ROWS or self.gg.permuted(t):
            return fn(_stack([self.gg.blocks(p) for p in plan.parts]))
        out: dict[str, np.ndarray] = {}
        for r in range(0, plan.n, _CHUNK_ROWS):
            rows = slice(r, min(plan.n, r + _CHUNK_ROWS))
            for key, a in fn(self.gg.blocks(t, rows)).items():
                if key not in out:
                    out[key] = np.empty((plan.n,) + a.shape[1:], a.dtype)
                out[key][rows] = a
        return out

    def _matmul(self, plan: _Plan) -> dict[str, np.ndarray]:
        if plan.method == "mlas":
            return self._mlas(plan, self._floats(plan))
        if plan.method == "q8":
            return self._chunks(plan, _q8)

        def pack(blocks: Blocks) -> dict[str, np.ndarray]:
            if not plan.zero_points:
                blocks = _recentred(blocks, plan.bits)
            if plan.float_residual:  # codes, scales, zero points over K; the residuals as floats
                q, scale, zp, residual = integer_part(blocks, plan.bits)
                return {"B": _pack(q, plan.bits), "scales": scale.astype(np.float32),
                        "zp": _pack(zp.astype(np.uint8), plan.bits), "residual": residual}
            packed, _ = _to_matmulnbits(blocks, plan.bits, residual_rows=plan.residual, zero_points=plan.zero_points)
            out = {"B": packed.b, "scales": packed.scales}
            if packed.zero_points is not None:
                out["zp"] = packed.zero_points
            return out
        return self._chunks(plan, pack)

    def _embedding(self, plan: _Plan) -> dict[str, np.ndarray]:
        if plan.method in ("mlas", "q8"):
            out = self._mlas(plan, self._floats(plan)) if plan.method == "mlas" else self._chunks(plan, _q8)
            out["B"] = out["B"].reshape(plan.n, -1)
            return out

        def pack(b: Blocks) -> dict[str, np.ndarray]:
            if not plan.zero_points:
                b = _recentred(b, plan.bits)
            q, scale, zp, residual = integer_part(b, plan.bits)
            if not plan.residual and np.any(np.abs(residual) > 1e-7 * np.maximum(np.abs(scale), 1e-30)):
                raise ValueError(f"{plan.parts[0].name}: offsets that are not whole zero points")
            return {"B": _pack(q.reshape(q.shape[0], plan.k), plan.bits), "scales": scale.astype(np.float32),
                    "zp": _pack(zp.astype(np.uint8), plan.bits), "residual": residual}
        return self._chunks(plan, pack)


@contextlib.contextmanager
def _builder_hooks(load_weights: Callable, save_model: Callable):
    """Point the model builder's weight loading and saving at ours, and restore them after."""
    import onnxruntime_genai.models.builder  # noqa: F401  (imports every builder)

    classes = {id(m.Model): m.Model for k, m in list(sys.modules.items())
               if k.endswith("builders.base") and hasattr(m, "Model")}
    if not classes:
        raise Unsupported("onnxruntime-genai's builder has no builders.base.Model to hook")
    saved = [(c, c.__dict__["load_weights"], c.__dict__["save_model"]) for c in classes.values()]
    try:
        for c in classes.values():
            c.load_weights, c.save_model = load_weights, save_model
        yield
    finally:
        for c, lw, sm in saved:
            c.load_weights, c.save_model = lw, sm


@contextlib.contextmanager
def _hushed():
    """Library chatter (the builder's per-layer lines, transformers' warnings) kept off the
    terminal; returned for error messages."""
    from transformers.utils import logging as hf_logging

    buf = io.StringIO()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    finally:
        hf_logging.set_verbosity(level)


def gguf_rope(path: Path, arch: str, config) -> None:
    """Put what transformers' GGUF config leaves out of a Phi-3 GGUF's RoPE into ``config``:
    the original (pre-training) context, a partial rotary dimension (Phi-4-mini) and LongRoPE
    (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini), which llama.cpp's converter stores as
    ``phi3.rope.scaling.original_context_length``, ``phi3.rope.dimension_count``,
    ``phi3.rope.scaling.attn_factor`` and the F32 tensors ``rope_factors_long/short.weight``
    (rope dimension / 2 each; they are settings, not weights). Without factors the model is
    plain RoPE (as llama.cpp and transformers run it), so the original context is the context
    (else the builder takes it for LongRoPE). An inconsistent GGUF raises SourceError (one line)."""
    if arch != "phi3":
        return
    import math

    from gguf.quants import dequantize

    from ..errors import SourceError

    keys = {f"phi3.{k}" for k in ("context_length", "rope.dimension_count", "rope.scaling.original_context_length",
                                  "rope.scaling.attn_factor")}
    meta: dict = {}
    try:
        table = _tensor_table(path, frozenset(keys), meta)
    except Unsupported as e:  # a file this reader cannot parse is not one to export either way
        raise SourceError(f"{path.name}: {e}") from None
    ctx = int(meta.get("phi3.context_length", config.max_position_embeddings))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope_dims = int(meta.get("phi3.rope.dimension_count", head_dim))
    if rope_dims <= 0 or rope_dims % 2 or rope_dims > head_dim:
        raise SourceError(f"{path.name}: phi3.rope.dimension_count is {rope_dims}; it must be even and at most "
                          f"the head size {head_dim} (corrupt GGUF?)")
    rp = dict(getattr(config, "rope_parameters", None) or {})
    partial = rope_dims / head_dim
    if partial != 1.0:
        rp["partial_rotary_factor"] = partial
        config.partial_rotary_factor = partial
    found = {k: table.get(f"rope_factors_{k}.weight") for k in ("long", "short")}
    if (found["long"] is None) != (found["short"] is None):
        missing = "long" if found["long"] is None else "short"
        raise SourceError(f"{path.name} has rope_factors_{'short' if missing == 'long' else 'long'}.weight but no "
                          f"rope_factors_{missing}.weight; LongRoPE needs both (corrupt GGUF?)")
    orig = int(meta.get("phi3.rope.scaling.original_context_length", ctx))
    factors: dict[str, list[float]] = {}
    for k, t in found.items():
        if t is None:
            continue
        if len(t.shape) != 1 or int(t.shape[0]) != rope_dims // 2:
            raise SourceError(f"{path.name}: rope_factors_{k}.weight has shape {list(t.shape)}, not [{rope_dims // 2}] "
                              f"(half the rope dimension {rope_dims}); corrupt or mismatched GGUF")
        a = np.asarray(dequantize(read_raw(path, t), t.tensor_type), np.float64).reshape(-1)
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise SourceError(f"{path.name}: rope_factors_{k}.weight holds values that are not positive finite numbers")
        factors[k] = [float(x) for x in a]
    if not factors or (orig == ctx and all(x == 1.0 for x in factors["short"])):
        # plain RoPE (short factors of 1 within the original context change nothing)
        config.original_max_position_embeddings = ctx
        if rp:
            config.rope_parameters = rp
        return
    if not 0 < orig < ctx:
        raise SourceError(f"{path.name}: LongRoPE factors with an original context of {orig} for a context of {ctx}; "
                          "the original context must be smaller (corrupt GGUF?)")
    rp.update(rope_type="longrope", type="longrope", long_factor=factors["long"], short_factor=factors["short"],
              original_max_position_embeddings=orig)
    rp.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    attn = meta.get("phi3.rope.scaling.attn_factor")
    if attn is not None:
        attn = float(attn)
        default = math.sqrt(1 + math.log(ctx / orig) / math.log(orig))
        if not (attn > 0 and math.isfinite(attn)):
            raise SourceError(f"{path.name}: phi3.rope.scaling.attn_factor is {attn}")
        rp["attention_factor"] = attn  # transformers' cos/sin scale
        if abs(attn - default) > 1e-6 * default:  # the builder computes the default unless told
            rp["short_mscale"] = rp["long_mscale"] = attn
    config.rope_parameters = rp
    config.original_max_position_embeddings = orig


def _hf_folder(src, out: Path):
    """config.json, tokenizer and generation config from the GGUF's metadata (no weights)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from ..errors import SourceError

    folder, name = str(src.path.parent), src.path.name
    try:
        with _hushed():
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise SourceError(f"transformers cannot read {src.path}: {str(e).splitlines()[0][:200]}") from None
    config.architectures = [src.architecture]
    gguf_rope(src.path, src.model_type, config)
    with _hushed():
        config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        gen = GenerationConfig.from_model_config(config)
        if tokenizer.eos_token_id is not None:
            gen.eos_token_id = tokenizer.eos_token_id
        gen.save_pretrained(out)
    return config


def _meta_model(src, work: Path):
    """The HF folder (config, tokenizer) under ``work``, a meta-device transformers model of the
    GGUF whose 1-D parameters (norm weights, biases) hold their real values, and the GGUF's tensors."""
    if src.model_type not in STREAMING:
        raise Unsupported(f"streaming covers {', '.join(STREAMING)} GGUFs, not {src.model_type}")
    import torch
    from transformers import AutoModelForCausalLM

    hf_dir = work / "hf"
    with stage(f"Reading {src.path.name}'s configuration and tokenizer"), ticking("converting the tokenizer"):
        config = _hf_folder(src, hf_dir)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gg = _Gguf(src.path, src.model_type, config.to_dict(), meta)
    for name, p in list(meta.named_parameters()):
        if p.ndim == 1:  # norm weights, biases: real values, so the builder reads them as usual
            t = gg.tensor(name)
            module, leaf = meta.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(module, leaf, torch.nn.Parameter(torch.from_numpy(np.array(gg.floats(t), np.float32)),
                                                     requires_grad=False))
    return hf_dir, config, meta, gg


def export(src, out_dir: Path, work: Path, execution_provider: str, options: dict[str, str],
           max_bits: int = 8) -> tuple[Path, dict]:
    """Write ``out_dir``'s model.onnx(.data), genai_config.json and tokenizer files from the GGUF
    ``src``. Returns the temporary HF folder (config, tokenizer) and the quantization report.
    ``max_bits=4``: a speculative draft, its wider types quantized again to 4 bits (see _plan)."""
    hf_dir, config, meta, gg = _meta_model(src, work)
    with stage(f"Building the graph for {execution_provider} with onnxruntime-genai's model builder"), \
            ticking("building"):
        captured = build_graph(meta, hf_dir, out_dir, work, execution_provider, options)
    captured["max_bits"] = max_bits
    report = Report()
    model = captured.pop("model")
    weights = _rewrite(model, gg, config, captured, report)
    save_streamed(model, out_dir / captured["filename"], "Writing the tensors from the GGUF")
    weights.key, weights.value = None, {}  # the last tensor's arrays; the graph's lazy tensors refer to this
    del model
    gc.collect()  # the graph's reference cycles, before the caller loads the artifact to check it
    return hf_dir, report.manifest()


def export_float(src, out_dir: Path, work: Path) -> Path:
    """The builder's FP32 CPU graph of the GGUF ``src`` in ``out_dir`` (model.onnx(.data),
    genai_config.json, tokenizer files), each weight dequantized from its GGUF blocks as it is
    written: what the builder makes from transformers' dequantized model, without a float copy of
    the model in memory (the static recipe's source graph). Returns the HF folder."""
    hf_dir, config, meta, gg = _meta_model(src, work)
    with stage("Building the float graph with onnxruntime-genai's model builder"), ticking("building"):
        captured = build_graph(meta, hf_dir, out_dir, work, "cpu", {})

    def floats(parts: list, shape: tuple[int, int], transpose: bool) -> np.ndarray:
        """The parts' rows (dequantized a slice at a time for big tensors: it takes copies)."""
        k = int(parts[0].shape[0])
        rows = [int(t.shape[1]) for t in parts]
        if any(int(t.shape[0]) != k for t in parts) or (sum(rows), k)[:: -1 if transpose else 1] != shape:
            raise Unsupported(f"the GGUF tensors {', '.join(t.name for t in parts)} are not {list(shape)}")
        out = np.empty(shape, np.float32)
        at = 0
        for t, n in zip(parts, rows):
            step = n if n <= _CHUNK_ROWS or gg.permuted(t) else _CHUNK_ROWS
            for r in range(0, n, step):
                a = gg.floats(t) if step == n else gg.floats(t, slice(r, min(n, r + step)))
                if transpose:
                    out[:, at + r: at + r + a.shape[0]] = a.T
                else:
                    out[at + r: at + r + a.shape[0]] = a
                del a
            at += n
        return out

    save_float_graph(captured.pop("model"), out_dir / captured["filename"],
                     lambda module: gg.merged([gg.tensor(f"{m}.weight") for m in _hf_modules(module)]), floats,
                     "GGUF", "Writing the GGUF's tensors as float32")
    gc.collect()
    return hf_dir


def save_float_graph(model, path: Path, parts_of: Callable[[str], list], floats: Callable[..., np.ndarray],
                     source: str, what: str) -> None:
    """The builder's float graph (from a meta-device model) saved with every MatMul weight and the
    embedding table computed as it is written: ``floats(parts_of(module), shape, transpose)``, the
    float32 rows of the builder module's ``source`` tensors (transposed for a MatMul's [K, N])."""
    import onnx_ir as ir

    graph, made = model.graph, set()

    def lazy(value, module: str, transpose: bool) -> None:
        shape = tuple(int(d) for d in value.const_value.shape)
        parts = parts_of(module)
        value.const_value = ir.LazyTensor(lambda: ir.Tensor(floats(parts, shape, transpose), name=value.name),
                                          dtype=ir.DataType.FLOAT, shape=ir.Shape(shape), name=value.name)
        made.add(value.name)

    for n in graph:
        w = n.inputs[1] if n.op_type == "MatMul" and len(n.inputs) > 1 else None
        if w is None or w.const_value is None or w.name in made:
            continue
        if not w.name.endswith(".MatMul.weight"):
            raise Unsupported(f"cannot map the MatMul weight {w.name} to {source} tensors")
        lazy(w, w.name[: -len(".MatMul.weight")], True)
    table = graph.initializers.get("model.embed_tokens.weight")
    if table is None:
        raise Unsupported("the builder graph has no model.embed_tokens.weight")
    lazy(table, "model.embed_tokens", False)
    check_materialized(graph, made, source)
    save_streamed(model, path, what)


def build_graph(meta, hf_dir: Path, out_dir: Path, work: Path, execution_provider: str, options: dict[str, str],
                check: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run onnxruntime-genai's builder on the meta-device model ``meta`` (config and tokenizer
    from ``hf_dir``) and take its float graph before it would quantize or save anything.
    ``check(builder)`` may refuse the builder's settings (raising Unsupported). Returns the graph
    (``model``), its ``filename`` and the int4 settings the builder would have used."""
    captured: dict[str, Any] = {}

    def load_weights(self, input_path):
        captured["loaded"] = True
        return meta

    def save_model(self, out_dir_):
        if not captured.get("loaded"):
            raise Unsupported(f"the builder's {type(self).__name__} loads its weights its own way")
        if check is not None:
            check(self)
        q = self.quant_attrs
        self.stamp_build_metadata(self.model)
        captured.update(model=self.model, filename=self.filename, symmetric=bool(q["is_symmetric"]),
                        accuracy_level=int(q["accuracy_level"]), block_size=int(q["matmul_block_size"]))

    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    # the embedding is ours to write (shared with lm_head when tied, as the builder would)
    kv = [f"{k}={v}" for k, v in options.items()] + ["shared_embeddings=false"]
    try:
        with _builder_hooks(load_weights, save_model), _hushed() as chatter:
            extra = parse_extra_options(None, str(hf_dir), str(out_dir), "int4", execution_provider,
                                        str(work / "cache"), kv)
            if "hf_details" in extra:
                from .builder import _flatten_rope

                _flatten_rope(extra["hf_details"]["hf_config"])
            create_model(None, str(hf_dir), str(out_dir), "int4", execution_provider, str(work / "cache"), **extra)
    except Unsupported:
        raise
    except Exception as e:  # the builder could not make a graph from this model on the meta device
        raise Unsupported(f"the builder stopped: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}") from None
    if "model" not in captured:
        raise Unsupported("the builder wrote no graph" + (f" ({chatter.getvalue().strip().splitlines()[-1][:150]})"
                                                           if chatter.getvalue().strip() else ""))
    del captured["loaded"]
    return captured


def check_materialized(graph, made: set[str], source: str) -> None:
    """Every initializer of ``graph`` not in ``made`` must hold real data: one the builder took
    from the meta-device model (no data) means a weight was not mapped to a ``source`` tensor."""
    import onnx_ir as ir

    for name, v in list(graph.initializers.items()):
        if name in made:
            continue
        t = v.const_value
        if isinstance(t, ir.LazyTensor):
            if int(np.prod(t.shape.numpy())) > (1 << 22):
                raise Unsupported(f"cannot map the initializer {name} to a {source} tensor")
            try:
                t.numpy()
            except NotImplementedError:  # a meta tensor: no data
                raise Unsupported(f"cannot map the initializer {name} to a {source} tensor") from None
        elif getattr(getattr(t, "raw", None), "is_meta", False):
            raise Unsupported(f"cannot map the initializer {name} to a {source} tensor")


def _rewrite(model, gg: _Gguf, config, settings: dict, report: Report) -> "_Weights":
    import onnx_ir as ir

    graph = model.graph
    weights = _Weights(gg, settings["symmetric"])
    made: set[str] = set()  # initializers created here

    def const(name: str, data, dtype=None, shape=None):
        if callable(data):
            def compute() -> ir.Tensor:
                a = np.ascontiguousarray(data())
                if a.shape != tuple(shape) or ir.DataType.from_numpy(a.dtype) != dtype:
                    raise AssertionError(f"{name}: computed {a.dtype}{list(a.shape)}, the graph says {dtype}{list(shape)}")
                return ir.Tensor(a, name=name)
            t = ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape), name=name)
        else:
            t = ir.tensor(np.asarray(data), name=name)
        v = ir.Value(name=name, shape=t.shape, type=ir.TensorType(t.dtype), const_value=t)
        graph.register_initializer(v)
        made.add(name)
        return v

    def node(op, inputs, name, domain="", **attrs):
        n = ir.node(op, inputs, attrs, domain=domain, name=name, num_outputs=1)
        n.outputs[0].name = f"{name}/output_0"
        return n

    block_sums: dict[tuple, ir.Value] = {}

    def augmented(x, base: str, plan: _Plan, before) -> ir.Value:
        """[x, block sums of x (zero-padded to whole blocks)]: the input of residual rows. A
        MatMul with a 0/1 matrix E [K, k_extra] (shared per shape) where E is small: one op, as
        gguf_repack does; else Reshape + ReduceSum + Pad (E would be read for every token)."""
        nb, key = plan.k // plan.block, (x.name, plan.block, plan.k_extra)
        if key not in block_sums:
            tag = f"{base}.block_sums"
            if plan.k * plan.k_extra * 4 <= _SMALL_E:
                e_name = f"block_sums.E.{plan.k}x{plan.k_extra}.block{plan.block}"
                if e_name not in graph.initializers:
                    e = np.zeros((plan.k, plan.k_extra), np.float32)
                    e[np.arange(plan.k), np.arange(plan.k) // plan.block] = 1.0
                    const(e_name, e)
                nodes = [node("MatMul", [x, graph.initializers[e_name]], f"{tag}/MatMul")]
            else:
                shape = const(f"{tag}.shape", np.array([0, 0, nb, plan.block], np.int64))
                nodes = [node("Reshape", [x, shape], f"{tag}/Reshape")]
                nodes.append(node("ReduceSum", [nodes[-1].outputs[0], const(f"{tag}.axes", np.array([-1], np.int64))],
                                  f"{tag}/ReduceSum", keepdims=0))
                if plan.k_extra > nb:
                    pads = const(f"{tag}.pads", np.array([0, 0, 0, 0, 0, plan.k_extra - nb], np.int64))
                    nodes.append(node("Pad", [nodes[-1].outputs[0], pads], f"{tag}/Pad"))
            nodes.append(node("Concat", [x, nodes[-1].outputs[0]], f"{tag}/Concat", axis=-1))
            graph.insert_before(before, nodes)
            block_sums[key] = nodes[-1].outputs[0]
        return block_sums[key]

    def matmul_inputs(plan: _Plan, base: str) -> list:
        nbt = plan.blocks_total
        blob = plan.block * plan.bits // 8
        ins = [const(f"{base}.weight_Q{plan.bits}", lambda: weights.get(plan, "B"), ir.DataType.UINT8, (plan.n, nbt, blob)),
               const(f"{base}.weight_scales", lambda: weights.get(plan, "scales"), ir.DataType.FLOAT, (plan.n, nbt))]
        if plan.zero_points:
            ins.append(const(f"{base}.weight_zp", lambda: weights.get(plan, "zp"), ir.DataType.UINT8,
                             (plan.n, -(-nbt * plan.bits // 8))))
        return ins

    def to_matmulnbits(n, x, plan: _Plan, base: str) -> None:
        """Turn node ``n`` (a MatMul, or a fresh node) into the MatMulNBits of ``plan`` (with float
        residuals: into the Add of that MatMulNBits and block sums of x times the residual table,
        ``{base}.residual`` [K / block, N])."""
        out = n
        if plan.float_residual:
            nb = plan.k // plan.block
            n = node("MatMul", [x, out.inputs[1]], f"{out.name}/MatMulNBits")
            tag = f"{base}.block_sums"
            table = const(f"{base}.residual", lambda: weights.get(plan, "residual").T, ir.DataType.FLOAT, (nb, plan.n))
            r = node("Reshape", [x, const(f"{tag}.shape", np.array([0, 0, nb, plan.block], np.int64))], f"{tag}/Reshape")
            sums = node("ReduceSum", [r.outputs[0], const(f"{tag}.axes", np.array([-1], np.int64))], f"{tag}/ReduceSum",
                        keepdims=0)
            offsets = node("MatMul", [sums.outputs[0], table], f"{base}.residual/MatMul")
            graph.insert_before(out, [n, r, sums, offsets])
            report.corrected += 1
        ins = matmul_inputs(plan, base)
        if plan.k_extra:
            x = augmented(x, base, plan, n)
            report.corrected += 1
        n.op_type, n.domain = "MatMulNBits", "com.microsoft"
        n.resize_inputs(len(ins) + 1)
        n.replace_input_with(0, x)
        for i, v in enumerate(ins, 1):
            n.replace_input_with(i, v)
        n.attributes.clear()
        for a, val in (("K", plan.k + plan.k_extra), ("N", plan.n), ("bits", plan.bits), ("block_size", plan.block),
                       ("accuracy_level", settings["accuracy_level"])):
            n.attributes[a] = ir.AttrInt64(a, val)
        for t, kind in zip(plan.parts, plan.kinds):
            report.add(t.name, kind, plan.describe(), plan.method)
        if out is not n:  # the original node: the sum
            out.op_type, out.domain = "Add", ""
            out.resize_inputs(2)
            out.replace_input_with(0, n.outputs[0])
            out.replace_input_with(1, offsets.outputs[0])
            out.attributes.clear()

    lm_plan: _Plan | None = None
    lm_base = None
    for n in list(graph):
        if n.op_type != "MatMul" or n.inputs[1] is None or n.inputs[1].const_value is None:
            continue
        wname = n.inputs[1].name
        if not wname.endswith(".MatMul.weight"):
            raise Unsupported(f"cannot map the MatMul weight {wname} to GGUF tensors")
        base = wname[: -len(".weight")]
        modules = _hf_modules(wname[: -len(".MatMul.weight")])
        parts = gg.merged([gg.tensor(f"{m}.weight") for m in modules])
        k, n_total = (int(d) for d in n.inputs[1].const_value.shape)
        plans = _plan(parts, settings["symmetric"], settings["block_size"], settings["max_bits"])
        if wname == "lm_head.MatMul.weight" and len(plans) == 1 and plans[0].residual:
            # the logits take lm_head's rounding errors as they are: its offsets stay exact floats
            plans[0].float_residual = True
        if any(p.k != k for p in plans) or sum(p.n for p in plans) != n_total:
            raise Unsupported(f"the GGUF tensors of {wname} do not have its shape [{k}, {n_total}]")
        old = n.inputs[1]
        x = n.inputs[0]
        if len(plans) == 1:
            to_matmulnbits(n, x, plans[0], base)
        else:  # mixed precisions in a fused q|k|v: one MatMulNBits each, concatenated
            outs = []
            for i, p in enumerate(plans):
                sub = node("MatMul", [x, old], f"{n.name}_{i}")
                graph.insert_before(n, [sub])
                to_matmulnbits(sub, x, p, f"{base}_{i}")
                outs.append(sub.outputs[0])
            n.op_type, n.domain = "Concat", ""
            n.resize_inputs(len(outs))
            for i, v in enumerate(outs):
                n.replace_input_with(i, v)
            n.attributes.clear()
            n.attributes["axis"] = ir.AttrInt64("axis", -1)
        graph.initializers.pop(old.name)
        if wname == "lm_head.MatMul.weight" and len(plans) == 1:
            lm_plan, lm_base = plans[0], base

    gathers = [n for n in graph if n.op_type == "Gather" and n.inputs[0] is not None
               and n.inputs[0].name == "model.embed_tokens.weight"]
    if len(gathers) != 1:
        raise Unsupported(f"expected one embedding Gather, found {len(gathers)}")
    _embedding(graph, gathers[0], gg, lm_plan, lm_base, weights, settings, report, const, node)

    check_materialized(graph, made, "GGUF")
    return weights


def _embedding(graph, gather, gg: _Gguf, lm_plan, lm_base, weights: _Weights, settings, report: Report,
               const, node) -> None:
    """The embedding Gather -> GatherBlockQuantized over the GGUF's own blocks (sharing lm_head's
    codes, scales, zero points and float residual table when lm_head is the same GGUF tensor
    without residual rows)."""
    import onnx_ir as ir

    t = gg.tensor("model.embed_tokens.weight")
    (plan,) = _plan([t], settings["symmetric"], settings["block_size"], settings["max_bits"])
    ids = gather.inputs[1]
    nb = plan.k // plan.block
    shared = lm_plan is not None and lm_plan.parts == [t] and not lm_plan.k_extra
    if shared:
        base = lm_base
        flat = const(f"{base}.weight_Q{lm_plan.bits}.shape", np.array([plan.n, nb * plan.block * plan.bits // 8], np.int64))
        reshape = node("Reshape", [graph.initializers[f"{base}.weight_Q{lm_plan.bits}"], flat], "/model/embed_tokens/Reshape")
        ins = [reshape.outputs[0], ids, graph.initializers[f"{base}.weight_scales"]]
        if lm_plan.zero_points:
            ins.append(graph.initializers[f"{base}.weight_zp"])
        graph.insert_before(gather, [reshape])
        how = replace(plan, residual=False).describe("GatherBlockQuantized") + ", shared with lm_head"
    else:
        base = "model.embed_tokens"
        ins = [const(f"{base}.weight_Q{plan.bits}", lambda: weights.get(plan, "B", True), ir.DataType.UINT8,
                     (plan.n, plan.k * plan.bits // 8)),
               ids,
               const(f"{base}.weight_scales", lambda: weights.get(plan, "scales", True), ir.DataType.FLOAT, (plan.n, nb))]
        if plan.zero_points:
            ins.append(const(f"{base}.weight_zp", lambda: weights.get(plan, "zp", True), ir.DataType.UINT8,
                             (plan.n, -(-nb * plan.bits // 8))))
        how = plan.describe("GatherBlockQuantized")
    attrs = {"bits": plan.bits, "block_size": plan.block, "gather_axis": 0, "quantize_axis": 1}
    old = gather.inputs[0]
    if plan.residual:  # gathered per-block float offsets added to the gathered codes
        gbq = node("GatherBlockQuantized", ins, "/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft", **attrs)
        if shared:  # lm_head's [nb, N] table: columns gathered, [nb, batch, seq] -> [batch, seq, nb]
            g = node("Gather", [graph.initializers[f"{lm_base}.residual"], ids], "/model/embed_tokens/residual/Gather",
                     axis=1)
            r = node("Transpose", [g.outputs[0]], "/model/embed_tokens/residual/Transpose", perm=[1, 2, 0])
            graph.insert_before(gather, [g])
        else:
            table = const("model.embed_tokens.residual", lambda: weights.get(plan, "residual", True),
                          ir.DataType.FLOAT, (plan.n, nb))
            r = node("Gather", [table, ids], "/model/embed_tokens/residual/Gather")
        blocks = const("/model/embed_tokens/blocks_shape", np.array([0, 0, nb, plan.block], np.int64))
        one = const("/model/embed_tokens/residual_shape", np.array([0, 0, nb, 1], np.int64))
        y = node("Reshape", [gbq.outputs[0], blocks], "/model/embed_tokens/blocks/Reshape")
        rr = node("Reshape", [r.outputs[0], one], "/model/embed_tokens/residual/Reshape")
        add = node("Add", [y.outputs[0], rr.outputs[0]], "/model/embed_tokens/residual/Add")
        graph.insert_before(gather, [gbq, r, y, rr, add])
        gather.op_type = "Reshape"
        gather.resize_inputs(2)
        gather.replace_input_with(0, add.outputs[0])
        gather.replace_input_with(1, const("/model/embed_tokens/hidden_shape", np.array([0, 0, plan.k], np.int64)))
        gather.name = "/model/embed_tokens/residual/Reshape_out"
        how += ", float offsets gathered"
    else:
        gather.op_type, gather.domain = "GatherBlockQuantized", "com.microsoft"
        gather.resize_inputs(len(ins))
        for i, v in enumerate(ins):
            gather.replace_input_with(i, v)
        for a, val in attrs.items():
            gather.attributes[a] = ir.AttrInt64(a, val)
        gather.name = "/model/embed_tokens/GatherBlockQuantized"
    graph.initializers.pop(old.name)
    if shared:  # the tensor was counted with lm_head; record what it also is
        report.tensors[t.name] += f"; {how}"
        per = report.representations[plan.kinds[0]]
        per[how] = per.get(how, 0) + 1
    else:
        report.add(t.name + " (embedding)" if lm_plan is not None and lm_plan.parts == [t] else t.name,
                   plan.kinds[0], how, plan.method)


def save_streamed(model, path: Path, what: str) -> None:
    """Write ``model`` and its external data, computing the lazy initializers one at a time
    (``what``: the stage line, e.g. "Writing the tensors from the GGUF")."""
    import onnx_ir as ir

    model.graph.sort()
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        if p.exists():
            p.unlink()
    total = sum(1 for v in model.graph.initializers.values() if v.const_value is not None)
    with stage(f"{what} into {data.name}"):
        bar = Bar(total, "tensors")

        def callback(tensor, info) -> None:
            bar.total = info.total
            bar.update(info.index + 1)
        # small constants (shapes, axes) stay in the graph, where shape inference reads them
        ir.save(model, str(path), external_data=data.name, size_threshold_bytes=1024, callback=callback)
        bar.close()
    data.chmod(0o644)
    path.chmod(0o644)
