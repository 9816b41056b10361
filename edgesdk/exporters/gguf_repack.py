"""Put a GGUF's own quantized blocks into the builder's MatMulNBits weights.

The builder quantizes the dequantized GGUF weights again (RTN onto its own 4-bit grid): one
4-bit grid re-rounded onto another roughly doubles the quantization noise (SmolLM2-135M Q4_1:
+39% perplexity). Here every MatMulNBits whose source tensors are 4-bit GGUF blocks (Q4_0, Q4_1,
Q4_K) gets those exact codes and scales instead; with ``max_bits=8`` 5-8-bit tensors (Q5_0,
Q6_K, Q8_0) become exact 8-bit MatMulNBits too.

MatMulNBits dequantizes ``scale * (q - zero_point)`` with an integer zero point; GGUF's
affine types (Q4_1, Q4_K) have an arbitrary float offset per block. The integer part goes into
the zero point; the rest, a per-block residual ``r``, is added back the way llama.cpp computes
Q4_1 (``d * sum(q x) + m * sum(x)``): the graph appends each block's activation sum to the
input (one small MatMul + Concat per distinct input) and the residuals become extra rows of the
same MatMulNBits. Each repacked weight is checked against the float weight the builder was given.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .builder import drop_unused_initializers, save_graph
from .gguf_blocks import Blocks, decode
from .progress import say


@dataclass
class Report:
    repacked: dict[str, int] = field(default_factory=dict)  # GGUF type -> tensors carried over
    kept: dict[str, int] = field(default_factory=dict)  # reason -> nodes left as the builder made them
    corrected: int = 0  # nodes with a residual correction

    def manifest(self) -> dict:
        return {"carried": dict(sorted(self.repacked.items())), "requantized": dict(sorted(self.kept.items())),
                "offset_corrections": self.corrected}


def _hf_modules(module: str) -> list[str]:
    """The builder's module name -> the HF module(s) whose weights it holds (in N order)."""
    if module.endswith(".attn.qkv_proj"):
        base = module[: -len("qkv_proj")].replace(".attn.", ".self_attn.")
        return [base + p for p in ("q_proj", "k_proj", "v_proj")]
    return [module.replace(".attn.", ".self_attn.")]


class _Source:
    """GGUF tensors by HF module name, row-permuted the way transformers loads them."""

    def __init__(self, gguf_path: Path, hf_dir: Path, config: dict):
        import gguf
        from safetensors import safe_open
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.reader = gguf.GGUFReader(str(gguf_path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        field_ = self.reader.fields["general.architecture"]
        arch_name = bytes(field_.parts[field_.data[0]]).decode()
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
        self.names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
        self.processor = TENSOR_PROCESSORS.get(arch_name, TensorProcessor)(config=config)
        self.hf = {}
        for f in sorted(hf_dir.glob("*.safetensors")):
            with safe_open(str(f), "np") as fh:
                for k in fh.keys():
                    self.hf[k] = (f, k)

    def hf_weight(self, module: str) -> np.ndarray | None:
        from safetensors import safe_open

        key = f"{module}.weight"
        if key not in self.hf and module == "lm_head":
            key = "model.embed_tokens.weight"
        if key not in self.hf:
            return None
        f, k = self.hf[key]
        with safe_open(str(f), "np") as fh:
            return fh.get_tensor(k)

    def blocks(self, module: str) -> tuple[Blocks | None, str]:
        name = self.names.get_name(module)
        if name is None:
            return None, "no GGUF tensor"
        tensor = self.tensors.get(name + ".weight")
        if tensor is None and module == "lm_head":
            tensor = self.tensors.get(self.names.get_name("model.embed_tokens") + ".weight")
        if tensor is None:
            return None, "no GGUF tensor"
        b = decode(tensor)
        if b is None:
            return None, tensor.tensor_type.name
        n = b.shape[0]
        perm = self.processor.process(np.arange(n, dtype=np.int64).reshape(n, 1), tensor.name).weights
        perm = np.asarray(perm).reshape(n)
        return (b if np.array_equal(perm, np.arange(n)) else b.rows(perm)), tensor.tensor_type.name


def _stack(parts: list[Blocks]) -> Blocks:
    block = min(p.block for p in parts)
    parts = [p.split(block) for p in parts]
    return Blocks(np.concatenate([p.q for p in parts]), np.concatenate([p.scale for p in parts]),
                  np.concatenate([p.offset for p in parts]), block, max(p.bits for p in parts))


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] -> MatMulNBits bytes (4 bits: element 2i in the low nibble)."""
    if bits == 8:
        return q.astype(np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


@dataclass
class _Packed:
    b: np.ndarray  # [N, blocks, block * bits / 8]
    scales: np.ndarray  # [N, blocks]
    zero_points: np.ndarray | None  # [N, packed blocks]
    block: int
    bits: int
    k_extra: int  # residual rows appended after the original K (0: none)


def integer_part(src: Blocks, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``src`` as ``scale * (q - zp) + residual``: codes q [N, K // block, block], scale and
    integer zero point zp [N, K // block], and the float residual [N, K // block] that an integer
    zero point cannot say (zero for Q4_0, Q5_0, Q6_K, Q8_0; the float offsets of Q4_1, Q4_K)."""
    n, k = src.shape
    nb = k // src.block
    top, half = (1 << bits) - 1, 1 << (bits - 1)
    scale = src.scale.copy()
    zero = scale == 0
    safe = np.where(zero, 1, scale)
    zp = np.clip(np.rint(-src.offset / safe), 0, top)
    zp[zero] = half  # an all-zero block: code == zero point
    residual = np.where(zero, src.offset, src.offset + scale * zp).astype(np.float32)
    q = src.q.reshape(n, nb, src.block).copy()
    q[zero] = half
    return q, scale, zp, residual


def _to_matmulnbits(src: Blocks, bits: int, *, residual_rows: bool | None = None,
                    zero_points: bool | None = None) -> tuple[_Packed, np.ndarray]:
    """MatMulNBits weights for ``src`` and the exact residual [N, K // block] they carry in
    their extra rows (zeros when the offsets are whole zero points).

    ``residual_rows``/``zero_points``: None decides from the data; True/False fixes the layout
    in advance (a graph written before its weights are computed needs the shapes up front):
    True always emits them, False raises if the data needs them."""
    n, k = src.shape
    block, nb = src.block, k // src.block
    top, half = (1 << bits) - 1, 1 << (bits - 1)  # half: MatMulNBits' default zero point
    q, scale, zp, residual = integer_part(src, bits)
    codes, scales, zps = [q], [scale], [zp]
    k_extra = 0
    needed = bool(np.any(np.abs(residual) > 1e-7 * np.maximum(np.abs(scale), 1e-30)))
    if needed and residual_rows is False:
        raise ValueError("these blocks have float offsets, which need residual rows")
    if residual_rows or (residual_rows is None and needed):
        # residual r[n, b] multiplies the sum of the input over block b: extra input columns
        # (the block sums, zero-padded to whole blocks) times extra weight rows r.
        extra = -(-nb // block)
        k_extra = extra * block
        r = np.zeros((n, k_extra), np.float32)
        r[:, :nb] = residual
        r = r.reshape(n, extra, block)
        rs = np.abs(r).max(axis=-1) / (half - 1)
        rq = np.clip(np.rint(r / np.where(rs == 0, 1, rs)[..., None]) + half, 0, top)
        codes.append(rq.astype(np.uint8))
        scales.append(rs.astype(np.float32))
        zps.append(np.full((n, extra), half))
    q = np.concatenate(codes, axis=1).astype(np.uint8)
    scale = np.concatenate(scales, axis=1).astype(np.float32)
    zp = np.concatenate(zps, axis=1).astype(np.uint8)
    if zero_points is False and not np.all(zp == half):
        raise ValueError("these blocks need zero points")
    zp_packed = _pack(zp, bits) if zero_points or (zero_points is None and not np.all(zp == half)) else None
    return _Packed(_pack(q, bits), scale, zp_packed, block, bits, k_extra), \
        (residual if k_extra else np.zeros_like(residual)).astype(np.float32)


def _dequant(p: _Packed, k: int) -> np.ndarray:
    """Float weight [N, K] a MatMulNBits with ``p`` holds (residual rows left out)."""
    n, nb = p.scales.shape
    if p.bits == 8:
        q = p.b.reshape(n, nb, p.block).astype(np.float32)
    else:
        q = np.stack([p.b & 0x0F, p.b >> 4], axis=-1).reshape(n, nb, p.block).astype(np.float32)
    if p.zero_points is None:
        zp = np.full((n, nb), 1 << (p.bits - 1), np.float32)
    elif p.bits == 8:
        zp = p.zero_points.astype(np.float32)
    else:
        zp = np.stack([p.zero_points & 0x0F, p.zero_points >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.float32)
    w = (q - zp[..., None]) * p.scales[..., None]
    return w.reshape(n, -1)[:, :k]


def repack(model_dir: Path, gguf_path: Path, hf_dir: Path, config: dict, *, max_bits: int = 4,
           lm_head_bits: int | None = None, model_file: str = "model.onnx") -> Report:
    """Rewrite ``model_dir/model_file`` in place. Returns what was carried over and what was not."""
    import onnx
    from onnx import helper, numpy_helper

    path = model_dir / model_file
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    src = _Source(gguf_path, hf_dir, config)
    report = Report()
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    block_sums: dict[tuple[str, int, int], str] = {}  # (input, block, k_extra) -> augmented input
    new_nodes: list[tuple[object, list]] = []  # (MatMulNBits node, nodes to insert before it)

    def keep(reason: str) -> None:
        report.kept[reason] = report.kept.get(reason, 0) + 1

    for node in [n for n in graph.node if n.op_type == "MatMulNBits"]:
        m = re.fullmatch(r"(.+)\.MatMul\.weight_Q\d", node.input[1])
        if not m:
            keep("unknown weight name")
            continue
        name = m.group(1)
        modules = _hf_modules(name)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n = int(attrs["K"]), int(attrs["N"])
        parts, kinds = [], []
        for hf_module in modules:
            b, kind = src.blocks(hf_module)  # kind: the GGUF type, or why there are no blocks
            if b is None:
                break
            parts.append(b)
            kinds.append(kind)
        if len(parts) != len(modules):
            keep(kind)
            continue
        blocks = _stack(parts)
        limit = lm_head_bits or max_bits if name == "lm_head" else max_bits
        if blocks.bits > limit:
            keep(f"{'/'.join(sorted(set(kinds)))} (> {limit} bits)")
            continue
        if blocks.shape != (n, k):
            keep("shape mismatch")
            continue
        bits = 4 if blocks.bits <= 4 else 8
        floats = [src.hf_weight(h) for h in modules]
        if any(f is None for f in floats):
            keep("no float weight to check against")
            continue
        reference = np.concatenate(floats)
        exact = blocks.values()
        if reference.shape != exact.shape or not np.allclose(exact, reference, rtol=1e-5,
                                                             atol=1e-6 * float(np.abs(reference).max())):
            keep("does not match the builder's weights")
            continue
        packed, residual = _to_matmulnbits(blocks, bits)
        got = _dequant(packed, k) + np.repeat(residual, packed.block, axis=1)
        if not np.allclose(got, exact, rtol=1e-5, atol=1e-6 * float(np.abs(exact).max())):
            raise AssertionError(f"repacking {name} changed its values")
        # the shared embedding (GatherBlockQuantized reading lm_head's bytes) must stay exact
        shared = [c for c in consumers.get(node.input[1], []) if c is not node]
        if shared and (packed.k_extra or packed.zero_points is not None):
            keep("tied embedding with offsets")
            continue
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(packed.b, node.input[1]))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(packed.scales, node.input[2]))
        inputs = list(node.input) + [""] * max(0, 4 - len(node.input))
        inputs[3] = ""
        if packed.zero_points is not None:
            inputs[3] = f"{name}.MatMul.weight_zp"
            graph.initializer.append(numpy_helper.from_array(packed.zero_points, inputs[3]))
        while inputs[-1] == "":
            inputs.pop()
        inserted: list = []
        if packed.k_extra:
            report.corrected += 1
            key = (node.input[0], packed.block, packed.k_extra)
            if key not in block_sums:
                x = node.input[0]
                e_name = f"block_sums.E.{k}x{packed.k_extra}.block{packed.block}"
                if e_name not in inits:  # one 0/1 block-sum matrix per shape, shared
                    e = np.zeros((k, packed.k_extra), np.float32)
                    e[np.arange(k), np.arange(k) // packed.block] = 1.0
                    inits[e_name] = numpy_helper.from_array(e, e_name)
                    graph.initializer.append(inits[e_name])
                tag = f"{name}.block_sums"
                inserted.append(helper.make_node("MatMul", [x, e_name], [tag], name=tag + "/MatMul"))
                inserted.append(helper.make_node("Concat", [x, tag], [tag + ".x"], name=tag + "/Concat", axis=-1))
                block_sums[key] = tag + ".x"
            inputs[0] = block_sums[key]
        del node.input[:]
        node.input.extend(inputs)
        for a in node.attribute:
            if a.name == "bits":
                a.i = bits
            elif a.name == "block_size":
                a.i = packed.block
            elif a.name == "K":
                a.i = k + packed.k_extra
        for c in shared:
            _share_with_gather(graph, c, packed, k)
        new_nodes.append((node, inserted))
        for kd in kinds:
            report.repacked[kd] = report.repacked.get(kd, 0) + 1
    # insert block-sum nodes just before their first user, keeping the graph topologically sorted
    order = list(graph.node)
    for node, inserted in new_nodes:
        if inserted:
            i = next(j for j, x in enumerate(order) if x is node)
            order[i:i] = inserted
    del graph.node[:]
    graph.node.extend(order)
    _tidy(graph)
    save_graph(model, path)
    say(f"    carried {sum(report.repacked.values())} GGUF tensors over as they are "
        f"({', '.join(f'{v} {k}' for k, v in sorted(report.repacked.items())) or 'none'})"
        + (f"; re-quantized {sum(report.kept.values())} nodes ({', '.join(f'{v}: {k}' for k, v in sorted(report.kept.items()))})"
           if report.kept else ""))
    return report


def _share_with_gather(graph, node, packed: _Packed, k: int) -> None:
    """Point a tied embedding (Reshape of lm_head's bytes -> GatherBlockQuantized) at the new bytes."""
    from onnx import numpy_helper

    if node.op_type != "Reshape":
        raise ValueError(f"unexpected consumer {node.op_type} of a quantized weight")
    n = packed.scales.shape[0]
    shape_name = f"{node.name}/shape_{n}x{k * packed.bits // 8}"
    graph.initializer.append(numpy_helper.from_array(np.array([n, k * packed.bits // 8], np.int64), shape_name))
    node.input[1] = shape_name
    for g in graph.node:
        if g.op_type == "GatherBlockQuantized" and g.input[0] == node.output[0]:
            for a in g.attribute:
                if a.name == "bits":
                    a.i = packed.bits
                elif a.name == "block_size":
                    a.i = packed.block


def _tidy(graph) -> None:
    """Drop initializers nothing reads any more and value_info whose shapes were rewritten."""
    drop_unused_initializers(graph)
    del graph.value_info[:]  # intermediate shapes only; ORT infers them again
