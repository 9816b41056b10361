"""Read a GGUF tensor's own quantization: integer codes with a scale and an offset per block.

Every GGUF type handled here dequantizes as ``value = scale[n, b] * q[n, k] + offset[n, b]`` for
``k`` in block ``b`` of row ``n``. Keeping ``q`` and ``scale`` as they are (instead of
dequantizing to float and quantizing again onto another 4-bit grid) is what makes a GGUF-sourced
INT4 graph as accurate as the GGUF itself. The byte layouts follow gguf-py's own
``gguf.quants`` dequantizers, and ``decode`` checks its result against them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Blocks:
    q: np.ndarray  # uint8 [N, K] integer codes
    scale: np.ndarray  # float32 [N, K // block]
    offset: np.ndarray  # float32 [N, K // block]
    block: int
    bits: int  # bits the codes need (4, 5, 6 or 8)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def values(self) -> np.ndarray:
        n, k = self.q.shape
        q = self.q.reshape(n, k // self.block, self.block).astype(np.float32)
        return (q * self.scale[..., None] + self.offset[..., None]).reshape(n, k)

    def rows(self, index: np.ndarray) -> "Blocks":
        return Blocks(self.q[index], self.scale[index], self.offset[index], self.block, self.bits)

    def split(self, block: int) -> "Blocks":
        """The same values with a smaller block size (each block's scale and offset repeated)."""
        if block == self.block:
            return self
        r = self.block // block
        return Blocks(self.q, np.repeat(self.scale, r, axis=1), np.repeat(self.offset, r, axis=1), block, self.bits)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray, half: int) -> np.ndarray:
    """ggml's 4-bit packing: byte i holds element i (low nibble) and element i + half (high)."""
    lo, hi = qs & 0x0F, qs >> 4
    shape = qs.shape[:-1] + (-1, half)
    return np.concatenate([lo.reshape(shape), hi.reshape(shape)], axis=-1).reshape(qs.shape[:-1] + (-1,))


def _q4_0(raw):
    d, qs = _f16(raw[:, :2]), raw[:, 2:]
    return _nibbles(qs, 16), d, -8 * d, 32, 4


def _q4_1(raw):
    d, m, qs = _f16(raw[:, :2]), _f16(raw[:, 2:4]), raw[:, 4:]
    return _nibbles(qs, 16), d, m, 32, 4


def _q5_0(raw):
    d, qh, qs = _f16(raw[:, :2]), raw[:, 2:6], raw[:, 6:]
    high = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")
    return _nibbles(qs, 16) | (high << 4), d, -16 * d, 32, 5


def _q5_1(raw):
    d, m, qh, qs = _f16(raw[:, :2]), _f16(raw[:, 2:4]), raw[:, 4:8], raw[:, 8:]
    high = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")
    return _nibbles(qs, 16) | (high << 4), d, m, 32, 5


def _q8_0(raw):
    d, x = _f16(raw[:, :2]), raw[:, 2:].view(np.int8)
    return (x.astype(np.int16) + 128).astype(np.uint8), d, -128 * d, 32, 8


def _q4_k(raw):
    from gguf.quants import Q4_K

    n = raw.shape[0]
    d, dmin = _f16(raw[:, :2])[:, None], _f16(raw[:, 2:4])[:, None]
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(raw[:, 4:16]))
    qs = raw[:, 16:].reshape(n, 4, 32)  # 4 chunks of 64 values: low nibbles then high
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, 8, 32)
    return q.reshape(n, 256), (d * sc).reshape(n, 8), (-dmin * mn).reshape(n, 8), 32, 4


def _q5_k(raw):
    from gguf.quants import Q4_K

    n = raw.shape[0]
    d, dmin = _f16(raw[:, :2])[:, None], _f16(raw[:, 2:4])[:, None]
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(raw[:, 4:16]))
    qh, qs = raw[:, 16:48], raw[:, 48:]
    lo = (qs.reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hi = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 0x01
    q = lo.reshape(n, 8, 32) | (hi << 4)
    return q.reshape(n, 256), (d * sc).reshape(n, 8), (-dmin * mn).reshape(n, 8), 32, 5


def _q6_k(raw):
    n = raw.shape[0]
    ql, qh, sc, d = raw[:, :128], raw[:, 128:192], raw[:, 192:208].view(np.int8), _f16(raw[:, 208:210])
    lo = ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    lo = (lo & 0x0F).reshape(n, 2, 4, 32)
    hi = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    hi = (hi & 0x03).reshape(n, 2, 4, 32)
    q = (lo | (hi << 4)).reshape(n, 256)
    scale = d[:, None] * sc.astype(np.float32)
    return q, scale, -32 * scale, 16, 6


# GGML type name -> (bytes per block, values per block, decoder)
DECODERS = {
    "Q4_0": (18, 32, _q4_0),
    "Q4_1": (20, 32, _q4_1),
    "Q5_0": (22, 32, _q5_0),
    "Q5_1": (24, 32, _q5_1),
    "Q8_0": (34, 32, _q8_0),
    "Q4_K": (144, 256, _q4_k),
    "Q5_K": (176, 256, _q5_k),
    "Q6_K": (210, 256, _q6_k),
}


def decode(tensor) -> Blocks | None:
    """``tensor``: a ``gguf.GGUFReader`` tensor. None for types not handled (F16, Q2_K, Q3_K, IQ*, ...)."""
    kind = tensor.tensor_type.name
    if kind not in DECODERS or len(tensor.shape) != 2:
        return None
    k, n = (int(s) for s in tensor.shape)
    return decode_raw(kind, n, k, np.asarray(tensor.data), tensor.name)


def read_raw(path, tensor) -> np.ndarray:
    """A GGUF tensor's bytes, read into memory of their own (not a view of the file's memory map,
    whose pages would stay resident for the whole export)."""
    with open(path, "rb") as f:
        f.seek(int(tensor.data_offset))
        raw = np.fromfile(f, np.uint8, int(tensor.n_bytes))
    if raw.size != int(tensor.n_bytes):
        raise ValueError(f"{tensor.name}: the GGUF file ends inside the tensor (truncated file?)")
    return raw


_CHECK_ROWS = 4096  # rows compared with gguf-py's dequantizer at a time (bounds the float copies)


def decode_raw(kind: str, n: int, k: int, raw: np.ndarray, name: str = "tensor", check_rows: int | None = None) -> Blocks:
    """Decode the bytes of an [n, k] tensor of GGML type ``kind`` (one of DECODERS) and check the
    result against gguf-py's own dequantizer: every row, a slice at a time, or with ``check_rows``
    that many rows spread over the tensor (gguf-py's dequantizer is slow; the layout is the same
    in every row)."""
    import gguf

    nbytes, per, fn = DECODERS[kind]
    raw = np.ascontiguousarray(raw).reshape(n * k // per, nbytes)
    q, scale, offset, block, bits = fn(raw)
    b = Blocks(np.ascontiguousarray(q.reshape(n, k).astype(np.uint8)), scale.reshape(n, k // block).astype(np.float32),
               offset.reshape(n, k // block).astype(np.float32), block, bits)
    qtype = gguf.GGMLQuantizationType[kind]
    per_row = k // per
    if check_rows is not None and check_rows < n:
        picks = [np.unique(np.linspace(0, n - 1, check_rows).astype(np.int64))]
    else:
        picks = [np.arange(r, min(n, r + _CHECK_ROWS)) for r in range(0, n, _CHECK_ROWS)]
    for rows in picks:
        mine = raw.reshape(n, per_row, nbytes)[rows].reshape(-1, nbytes)
        ref = gguf.quants.dequantize(mine, qtype).reshape(-1, k)
        part = Blocks(b.q[rows], b.scale[rows], b.offset[rows], block, bits).values()
        if not np.allclose(part, ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max() or 1)):
            raise AssertionError(f"decoding {name} ({kind}) disagrees with gguf-py's dequantizer")
    return b
