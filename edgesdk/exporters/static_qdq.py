"""Weights quantized before calibration: the static pair's Gemm weights as DequantizeLinear
inputs, written one tensor at a time, so no stage of an NPU export holds the float model.

The calibration loop, the range observation and ``quantize_static`` then all run on a graph
whose weights are 8-bit (or 4-bit) integers: a 1.5B model's weights take 1.5 GB there instead of
6 GB of float32. onnxruntime's QDQ quantizer takes such pre-quantized weights as they are (it
skips a tensor a DequantizeLinear produces, and takes a bias's scale from that DequantizeLinear's
scale), so the quantized graph is what it would make from the float weights with the same
per-channel scales: the weights are quantized by its own ``quantize_nparray`` with the scales
we used to give it as overrides (symmetric, per output channel, absmax / qmax).

onnxruntime's CPU EP does not constant-fold a DequantizeLinear: each run dequantizes a weight
just before its Gemm and frees it after, so a session holds the integer weights only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .static import GRAPHS, _attrs, _prune, _refer, _rows, save_family

QMAX = {"int8": 127, "int4": 7}
ROWS = 4096  # output channels quantized at a time


class _Sink:
    """Arrays written to ``path`` one at a time, as they are made (the graphs refer to it by
    absolute location until save_family copies them into their weights file)."""

    def __init__(self, path: Path):
        self.path, self.f = path, open(path, "wb")

    def put(self, array: np.ndarray, name: str):
        from onnx import TensorProto, helper, numpy_helper

        if array.dtype in (np.int8, np.float32) and array.nbytes >= 1024:  # written as they are: no copy
            t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
            self.f.write(b"\0" * ((-self.f.tell()) % 64))
            offset, size = self.f.tell(), array.nbytes
            np.ascontiguousarray(array).tofile(self.f)
        else:
            t = numpy_helper.from_array(array, name)  # packs int4 (ml_dtypes) two to a byte
            raw = t.raw_data
            if len(raw) < 1024:
                return t
            self.f.write(b"\0" * ((-self.f.tell()) % 64))
            offset, size = self.f.tell(), len(raw)
            self.f.write(raw)
            del raw
        _refer(t, str(self.path.resolve()), offset, size)
        return t

    def close(self) -> None:
        self.f.close()


def gemm_weights(model) -> list[str]:
    """The Gemm weights (W^T [out, in], transB=1, initializers) of a graph from matmuls_to_gemm."""
    inits = {i.name for i in model.graph.initializer}
    return [n.input[1] for n in model.graph.node
            if n.op_type == "Gemm" and n.input[1] in inits and _attrs(n).get("transB") == 1]


def lm_head(model) -> str:
    """The widest Gemm weight: the lm_head (it stays 8-bit in A16W4)."""
    inits = {i.name: i for i in model.graph.initializer}
    return max(gemm_weights(model), key=lambda w: inits[w].dims[0])


def quantize_weight(rows: Callable[[int, int], np.ndarray], shape: tuple[int, int],
                    bits: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel (axis 0) quantization of W^T [out, in], read ROWS rows at a
    time by ``rows(start, stop)``: (codes, scales), the codes by onnxruntime.quantization's own
    quantize_nparray."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_nparray

    qtype = TensorProto.INT8 if bits == "int8" else TensorProto.INT4
    codes = np.empty(shape, np.int8)
    scale = np.empty(shape[0], np.float32)
    for r in range(0, shape[0], ROWS):  # rows are independent: the temporaries stay small
        rows_ = np.asarray(rows(r, min(shape[0], r + ROWS)), np.float32)
        scale[r: r + ROWS] = np.maximum(np.abs(rows_).max(axis=1), 1e-8).astype(np.float32) / QMAX[bits]
        codes[r: r + ROWS] = quantize_nparray(qtype, rows_, scale[r: r + ROWS, None], np.int8(0))
    return codes, scale


def prequantize_family(src: Path, dst: Path, precision: str) -> dict[str, int]:
    """The Gemm form of the pair in ``src`` (see static.gemm_family), with every Gemm weight an
    integer initializer behind a DequantizeLinear (axis 0, zero points 0), written to ``dst``
    weight by weight. ``precision``: int8 (every weight 8-bit) or int4 (4-bit, the lm_head 8-bit;
    static.block_weights then makes the 4-bit ones block-wise). Initializer and node names are the
    ones onnxruntime's quantizer gives a weight it quantizes itself."""
    import ml_dtypes
    import onnx
    from onnx import helper

    family = {g: onnx.load(str(src / f"{g}.onnx"), load_external_data=False) for g in GRAPHS}
    sink = _Sink(dst / "prequantized.data")
    made: dict[str, list] = {}
    try:
        for model in family.values():
            g = model.graph
            inits = {i.name: i for i in g.initializer}
            head = lm_head(model)
            dq = {}
            for name in gemm_weights(model):
                if name not in made:
                    bits = "int8" if precision == "int8" or name == head else "int4"
                    w = inits[name]
                    codes, scale = quantize_weight(lambda a, b, w=w: _rows(w, src, a, b),
                                                   (int(w.dims[0]), int(w.dims[1])), bits)
                    dtype = np.int8 if bits == "int8" else ml_dtypes.int4
                    made[name] = [sink.put(codes if dtype is np.int8 else codes.astype(dtype), f"{name}_quantized"),
                                  sink.put(scale, f"{name}_scale"),
                                  sink.put(np.zeros(scale.shape, dtype), f"{name}_zero_point")]
                    del codes
                g.initializer.extend(t for t in made[name] if t.name not in inits)
                dq[name] = helper.make_node("DequantizeLinear", [t.name for t in made[name]],
                                            [f"{name}_DequantizeLinear_Output"], name=f"{name}_DequantizeLinear", axis=0)
            # each DequantizeLinear just before its Gemm: static.calibration_options runs nodes in this
            # order, so one dequantized weight at a time is alive (all of them first: the float model)
            nodes = []
            for n in g.node:
                for i, x in enumerate(n.input):
                    if x in dq:
                        if dq[x] is not None:
                            nodes.append(dq[x])
                            dq[x] = None
                        n.input[i] = f"{x}_DequantizeLinear_Output"
                nodes.append(n)
            del g.node[:]
            g.node.extend(nodes)
            _prune(g)
    finally:
        sink.close()
    sizes = save_family(family, dst, base=src)
    (dst / "prequantized.data").unlink()
    return sizes
