"""The static recipe: fixed-shape prefill/decode graphs for NPUs (QNN HTP, OpenVINO) and CoreML.

The builder's FP32 CPU graph already has each architecture right (fused QKV, q/k norms,
biases, RoPE caches for every scaling). We rewrite it rather than write a second exporter:

- the embedding lookup moves to the host (``embed.npy``): CoreML's checker refuses Gather, and
  one graph family then serves every target; the graph takes ``inputs_embeds``;
- GroupQueryAttention becomes explicit attention (MatMul, Softmax, an additive mask input),
  with RoPE as ``x * cos + (x @ R) * sin`` where R is a constant signed permutation and cos/sin
  are inputs the host gathers from the builder's own caches (``rope.npz``): every RoPE scaling,
  partial rotary and interleaving works the same, with no Neg or Slice;
- the KV cache is a fixed-size input per layer (keys stored transposed, [1, kv, head, C], so no
  transpose of the cache runs per step); the graph outputs only the S new entries, which the
  host writes into its buffer;
- SkipSimplifiedLayerNormalization is split into Add + SimplifiedLayerNormalization (or, for
  CoreML, plain ONNX ops);
- two graphs, prefill (S tokens) and decode (1 token), share one weights file.

For the NPU (precision int8/int4) the pair's weight MatMuls become Gemm (see ``matmuls_to_gemm``)
and its weights are quantized per channel first (static_qdq); the pair is then calibrated on real
text run through its own static loop and quantized to Q/DQ (A16W8 / A16W4) with
onnxruntime.quantization's QNN helpers. No stage holds the float model: the source graph is
streamed from the GGUF or safetensors (gguf_stream/hf_stream.export_float), the rewrite reads its
weights one at a time, and calibration and quantization hold integer weights. CoreML gets an fp16
pair of plain ONNX operators.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UnsupportedArchitectureError
from . import progress

GRAPHS = ("prefill", "decode")
WEIGHTS = "weights.data"
EMBED = "embed.npy"
ROPE = "rope.npz"


@dataclass
class Shape:
    """What one static graph is specialised for."""
    seq: int  # tokens per call (S for prefill, 1 for decode)
    context: int  # C: cache slots
    dtype: str = "float32"  # io/weights: float32 or float16
    plain_ops: bool = False  # CoreML: no contrib ops (SimplifiedLayerNormalization decomposed)


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _rotation(head: int, rot: int, interleaved: bool) -> np.ndarray:
    """R with (x @ R)[i] = rotate_half(x)[i] over the first ``rot`` dims, 0 elsewhere."""
    r = np.zeros((head, head), np.float32)
    half = rot // 2
    for i in range(half):
        if interleaved:  # pairs (2i, 2i+1): out[2i] = -x[2i+1], out[2i+1] = x[2i]
            r[2 * i + 1, 2 * i], r[2 * i, 2 * i + 1] = -1, 1
        else:  # halves: out[i] = -x[i+half], out[i+half] = x[i]
            r[i + half, i], r[i, i + half] = -1, 1
    return r


def host_tables(model, genai: dict, base: str | Path = "") -> dict[str, Any]:
    """Read what moves to the host from the builder graph: the embedding table and RoPE caches
    (``base``: the folder of a graph loaded without its external data)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    gather = next((n for n in g.node if n.op_type == "Gather" and n.input[1] == "input_ids"), None)
    if gather is None:
        raise UnsupportedArchitectureError("the builder graph has no embedding Gather on input_ids")
    src = gather.input[0]
    if src in inits:
        table = _array(inits[src], base)
    elif src in producers and producers[src].op_type == "Transpose" and producers[src].input[0] in inits:
        table = _array(inits[producers[src].input[0]], base).T  # tied to the lm_head
    else:
        raise UnsupportedArchitectureError(f"cannot find the embedding table of {gather.name}")
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if not gqa:
        raise UnsupportedArchitectureError("the builder graph has no GroupQueryAttention node")
    a = _attrs(gqa[0])
    if not a.get("do_rotary"):
        raise UnsupportedArchitectureError("the static recipe needs RoPE inside attention (do_rotary=1)")
    cos = _array(inits[gqa[0].input[7]], base)
    sin = _array(inits[gqa[0].input[8]], base)
    for n in gqa[1:]:
        if n.input[7] != gqa[0].input[7] or _attrs(n).get("local_window_size", -1) != a.get("local_window_size", -1):
            raise UnsupportedArchitectureError(
                "layers with their own RoPE caches or attention windows (Gemma 2/3) are not supported by the "
                "static recipe yet")
    if a.get("local_window_size", -1) not in (-1, 0):
        raise UnsupportedArchitectureError("sliding-window attention is not supported by the static recipe yet")
    dec = genai["model"]["decoder"]
    return {"embed": np.ascontiguousarray(table), "cos": cos, "sin": sin,
            "interleaved": bool(a.get("rotary_interleaved", 0)), "head_size": dec["head_size"],
            "num_heads": dec["num_attention_heads"], "kv_heads": dec["num_key_value_heads"],
            "layers": dec["num_hidden_layers"]}


def rewrite(model, tables: dict[str, Any], shape: Shape, base: str | Path = ""):
    """One static graph from the builder graph (a copy: load ``model`` without its external data,
    from folder ``base``, and the copy is weightless too; save_family then streams the weights)."""
    from onnx import TensorProto, helper, numpy_helper

    m = copy.deepcopy(model)
    g = m.graph
    S, C = shape.seq, shape.context
    H, nh, kvh = tables["head_size"], tables["num_heads"], tables["kv_heads"]
    group = nh // kvh
    hidden = tables["embed"].shape[1]
    ftype = TensorProto.FLOAT16 if shape.dtype == "float16" else TensorProto.FLOAT
    npf = np.float16 if shape.dtype == "float16" else np.float32
    nodes, inits = [], []
    consts: dict[tuple, str] = {}

    def const(value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in consts:
            name = f"static/const_{len(consts)}"
            inits.append(numpy_helper.from_array(arr, name))
            consts[key] = name
        return consts[key]

    def node(op, ins, name, n_out=1, **attrs) -> list[str]:
        outs = [f"{name}/out{i}" for i in range(n_out)]
        nodes.append(helper.make_node(op, ins, outs, name=name, **attrs))
        return outs

    # -- the embedding moves to the host
    gather = next(n for n in g.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    renames = {gather.output[0]: "inputs_embeds"}
    mask_in, cos_in, sin_in = "attention_bias", "cos", "sin"
    rot = const(_rotation(H, tables["cos"].shape[1] * 2, tables["interleaved"]), npf)

    def rope(x, name):
        a = node("Mul", [x, cos_in], f"{name}/cos")[0]
        r = node("MatMul", [x, rot], f"{name}/rotate")[0]
        b = node("Mul", [r, sin_in], f"{name}/sin")[0]
        return node("Add", [a, b], f"{name}/add")[0]

    layer = 0
    new_nodes = []
    outputs = [helper.make_tensor_value_info("logits", ftype, [1, S, tables["embed"].shape[0]])]
    inputs = [helper.make_tensor_value_info("inputs_embeds", ftype, [1, S, hidden]),
              helper.make_tensor_value_info(mask_in, ftype, [1, 1, group * S, C + S]),
              helper.make_tensor_value_info(cos_in, ftype, [1, 1, S, H]),
              helper.make_tensor_value_info(sin_in, ftype, [1, 1, S, H])]
    for n in g.node:
        if n is gather:
            continue
        if n.op_type == "SkipSimplifiedLayerNormalization":
            a = _attrs(n)
            p = n.name.rsplit("/", 1)[0]
            total = n.output[3] if len(n.output) > 3 and n.output[3] else f"{p}/skip_add/out"
            new_nodes.append(helper.make_node("Add", [n.input[0], n.input[1]], [total], name=f"{p}/skip_add"))
            new_nodes.append(helper.make_node("SimplifiedLayerNormalization", [total, n.input[2]], [n.output[0]],
                                              name=f"{p}/norm", epsilon=a.get("epsilon", 1e-6), axis=-1,
                                              stash_type=1))
            continue
        if n.op_type != "GroupQueryAttention":
            new_nodes.append(n)
            continue
        a = _attrs(n)
        i = layer
        layer += 1
        p = f"/static/layers.{i}/attn"
        nodes.clear()
        if n.input[1]:  # separate q, k, v
            q, k, v = n.input[0], n.input[1], n.input[2]
        else:  # packed qkv
            q, k, v = node("Split", [n.input[0], const([nh * H, kvh * H, kvh * H])], f"{p}/split", 3, axis=-1)
        q = node("Reshape", [q, const([1, S, nh, H])], f"{p}/q_reshape")[0]
        q = node("Transpose", [q], f"{p}/q_transpose", perm=[0, 2, 1, 3])[0]
        q = rope(q, f"{p}/q_rope")
        q = node("Reshape", [q, const([1, kvh, group * S, H])], f"{p}/q_group")[0]
        k = node("Reshape", [k, const([1, S, kvh, H])], f"{p}/k_reshape")[0]
        k = node("Transpose", [k], f"{p}/k_transpose", perm=[0, 2, 1, 3])[0]
        k = rope(k, f"{p}/k_rope")
        nodes.append(helper.make_node("Transpose", [k], [f"new_key_values.{i}.key"], name=f"{p}/k_store", perm=[0, 1, 3, 2]))
        v = node("Reshape", [v, const([1, S, kvh, H])], f"{p}/v_reshape")[0]
        nodes.append(helper.make_node("Transpose", [v], [f"new_key_values.{i}.value"], name=f"{p}/v_store", perm=[0, 2, 1, 3]))
        keys = node("Concat", [f"past_key_values.{i}.key", f"new_key_values.{i}.key"], f"{p}/keys", axis=3)[0]
        values = node("Concat", [f"past_key_values.{i}.value", f"new_key_values.{i}.value"], f"{p}/values", axis=2)[0]
        s = node("MatMul", [q, keys], f"{p}/scores")[0]
        s = node("Mul", [s, const(a.get("scale") or 1 / np.sqrt(H), npf)], f"{p}/scale")[0]
        if a.get("softcap"):
            s = node("Mul", [s, const(1 / a["softcap"], npf)], f"{p}/softcap_div")[0]
            s = node("Tanh", [s], f"{p}/softcap_tanh")[0]
            s = node("Mul", [s, const(a["softcap"], npf)], f"{p}/softcap_mul")[0]
        s = node("Add", [s, mask_in], f"{p}/mask")[0]
        s = node("Softmax", [s], f"{p}/softmax", axis=-1)[0]
        o = node("MatMul", [s, values], f"{p}/context")[0]
        o = node("Reshape", [o, const([1, nh, S, H])], f"{p}/o_heads")[0]
        o = node("Transpose", [o], f"{p}/o_transpose", perm=[0, 2, 1, 3])[0]
        nodes.append(helper.make_node("Reshape", [o, const([1, S, nh * H])], [n.output[0]], name=f"{p}/o_merge"))
        new_nodes.extend(nodes)
        inputs += [helper.make_tensor_value_info(f"past_key_values.{i}.key", ftype, [1, kvh, H, C]),
                   helper.make_tensor_value_info(f"past_key_values.{i}.value", ftype, [1, kvh, C, H])]
        outputs += [helper.make_tensor_value_info(f"new_key_values.{i}.key", ftype, [1, kvh, H, S]),
                    helper.make_tensor_value_info(f"new_key_values.{i}.value", ftype, [1, kvh, S, H])]
    for n in new_nodes:
        for j, name in enumerate(n.input):
            if name in renames:
                n.input[j] = renames[name]
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(inits)
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend(outputs)
    del g.value_info[:]
    _prune(g)
    if shape.plain_ops:
        _decompose_norms(g)
    if shape.dtype == "float16":
        _to_fp16(g, base)
    _check_static(m)
    return m


def _prune(g) -> None:
    """Drop nodes nothing reads (the builder's mask subgraph) and initializers no node reads."""
    from .builder import drop_unused_initializers

    needed = {o.name for o in g.output}
    kept = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(i for i in n.input if i)
    del g.node[:]
    g.node.extend(reversed(kept))
    drop_unused_initializers(g)


def _decompose_norms(g) -> None:
    """SimplifiedLayerNormalization (an onnxruntime contrib op) as plain ONNX: x / sqrt(mean(x^2) + eps) * w."""
    from onnx import helper, numpy_helper

    out = []
    for n in g.node:
        if n.op_type != "SimplifiedLayerNormalization":
            out.append(n)
            continue
        eps = _attrs(n).get("epsilon", 1e-6)
        p, x = n.name, n.input[0]
        e = f"{p}/eps"
        g.initializer.append(numpy_helper.from_array(np.array(eps, np.float32), e))
        out += [helper.make_node("Mul", [x, x], [f"{p}/sq"], name=f"{p}/sq"),
                helper.make_node("ReduceMean", [f"{p}/sq", f"{p}/axes"], [f"{p}/ms"], name=f"{p}/ms", keepdims=1),
                helper.make_node("Add", [f"{p}/ms", e], [f"{p}/mse"], name=f"{p}/mse"),
                helper.make_node("Sqrt", [f"{p}/mse"], [f"{p}/rms"], name=f"{p}/rms"),
                helper.make_node("Div", [x, f"{p}/rms"], [f"{p}/normed"], name=f"{p}/normed"),
                helper.make_node("Mul", [f"{p}/normed", n.input[1]], [n.output[0]], name=f"{p}/scale")]
        g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{p}/axes"))
    del g.node[:]
    g.node.extend(out)


def _to_fp16(g, base: str | Path = "") -> None:
    """Every float initializer, input and output as float16 (the attention consts are made so already)."""
    from onnx import TensorProto, numpy_helper

    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            arr = _array(t, base).astype(np.float16)
            g.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))


def _check_static(m) -> None:
    """Fail unless every tensor has a static shape; keep the inferred shapes in the graph (the
    quantizer's calibration picks the tensors to observe from them)."""
    import onnx
    from onnx import helper

    # Infer on a weightless copy: big initializers become typed inputs, and the contrib
    # SimplifiedLayerNormalization (unknown to ONNX) an Identity of its input.
    g = m.graph
    light = helper.make_graph(
        [helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name)
         if n.op_type == "SimplifiedLayerNormalization" else n for n in g.node], "shapes",
        list(g.input) + [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                         for i in g.initializer if np.prod(i.dims) > 64],
        list(g.output), [i for i in g.initializer if np.prod(i.dims) <= 64])
    inferred = onnx.shape_inference.infer_shapes(
        helper.make_model(light, opset_imports=m.opset_import, ir_version=m.ir_version), strict_mode=True)
    outputs = {o.name for o in g.output}
    del g.value_info[:]
    g.value_info.extend(v for v in inferred.graph.value_info if v.name not in outputs)
    dyn = [v.name for v in list(inferred.graph.value_info) + list(inferred.graph.output)
           if any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)]
    known = {v.name for v in inferred.graph.value_info} | outputs
    dyn += [o for n in g.node for o in n.output if o and o not in known]
    if dyn:
        raise UnsupportedArchitectureError(f"the static graph still has dynamic shapes ({', '.join(dyn[:3])})")
    bad = sorted({n.op_type for n in m.graph.node} & {"Shape", "GroupQueryAttention", "SkipSimplifiedLayerNormalization",
                                                      "Range", "Expand", "NonZero"})
    if bad:
        raise UnsupportedArchitectureError(f"the static graph still has {', '.join(bad)} nodes")


def _external(t) -> dict[str, str] | None:
    from onnx import TensorProto

    if t.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in t.external_data}


def _refer(t, location: str, offset: int, length: int) -> None:
    """Make initializer ``t`` refer to ``length`` bytes at ``offset`` of external file ``location``."""
    from onnx import TensorProto

    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def _raw(t, base: str | Path = "") -> bytes | None:
    """The raw bytes of an initializer, read from its external file (relative to ``base``, or an
    absolute location) when it has one; None for typed fields (kept inline)."""
    ext = _external(t)
    if ext is None:
        return t.raw_data if t.HasField("raw_data") else None
    with open(Path(base) / ext["location"], "rb") as f:
        f.seek(int(ext.get("offset", 0)))
        return f.read(int(ext["length"])) if "length" in ext else f.read()


def _rows(t, base: str | Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a 2-D initializer (read from its external file alone, if it has one)."""
    ext = _external(t)
    if ext is None:
        return _array(t, base)[start:stop]
    from onnx import helper

    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    cols = int(t.dims[1])
    with open(Path(base) / ext["location"], "rb") as f:
        f.seek(int(ext.get("offset", 0)) + start * cols * dtype.itemsize)
        return np.fromfile(f, dtype, (stop - start) * cols).reshape(stop - start, cols)


def _array(t, base: str | Path = "") -> np.ndarray:
    """An initializer as an array, external data read from ``base`` (one tensor at a time)."""
    from onnx import helper, numpy_helper

    ext = _external(t)
    if ext is None:
        return numpy_helper.to_array(t)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.frombuffer(_raw(t, base), dtype).reshape(tuple(t.dims))


def save_family(models: dict[str, Any], folder: Path, data_name: str = WEIGHTS, base: str | Path = "") -> dict[str, int]:
    """Write graphs ``name.onnx`` whose initializers live once in ``folder/data_name`` (identical
    tensors of different graphs share one copy). Initializers may be external, read tensor by tensor
    from ``base`` (graphs loaded without their data): no graph's weights are ever all in memory.
    Returns bytes written / bytes referenced."""
    import onnx

    seen: dict[bytes, tuple[int, int]] = {}
    where: dict[tuple, tuple[int, int]] = {}  # external source (file, offset, length) -> its copy
    written = referenced = 0
    with open(folder / data_name, "wb") as f:
        for name, model in models.items():
            for t in model.graph.initializer:
                ext = _external(t)
                src = (ext.get("location"), ext.get("offset"), ext.get("length"), t.data_type) if ext else None
                if src is not None and src in where:
                    offset, length = where[src]
                else:
                    raw = _raw(t, base)
                    if raw is None or (ext is None and len(raw) < 1024):
                        continue  # small, or typed fields (packed int4 does not round-trip through numpy): inline
                    if len(raw) < 1024:
                        t.ClearField("data_location")
                        del t.external_data[:]
                        t.raw_data = raw
                        continue
                    key = hashlib.sha256(raw).digest() + bytes([t.data_type]) + str(list(t.dims)).encode()
                    if key not in seen:
                        pad = (-f.tell()) % 64
                        f.write(b"\0" * pad)
                        seen[key] = (f.tell(), len(raw))
                        f.write(raw)
                        written += len(raw)
                    del raw
                    offset, length = seen[key]
                    if src is not None:
                        where[src] = seen[key]
                referenced += length
                _refer(t, data_name, offset, length)
            onnx.save_model(model, str(folder / f"{name}.onnx"))
    (folder / data_name).chmod(0o644)
    return {"written": written, "referenced": referenced}


def write_host_tables(tables: dict[str, Any], folder: Path, dtype: str) -> None:
    np.save(folder / EMBED, np.asarray(tables["embed"], dtype))  # no copy when it is that dtype already
    np.savez(folder / ROPE, cos=tables["cos"].astype(np.float32), sin=tables["sin"].astype(np.float32),
             interleaved=np.array(tables["interleaved"]))


def build_family(builder_model_path: Path, genai: dict, folder: Path, chunk: int, context: int,
                 dtype: str = "float32", plain_ops: bool = False) -> dict[str, Any]:
    """The prefill/decode pair (FP32 or FP16) from the builder graph at ``builder_model_path``."""
    import onnx

    base = builder_model_path.parent  # weightless graphs: the weights stream from the builder's file
    model = onnx.load(str(builder_model_path), load_external_data=False)
    tables = host_tables(model, genai, base)
    family = {"prefill": rewrite(model, tables, Shape(chunk, context, dtype, plain_ops), base),
              "decode": rewrite(model, tables, Shape(1, context, dtype, plain_ops), base)}
    del model
    write_host_tables(tables, folder, dtype)
    vocab, hidden = tables["embed"].shape
    tables["embed"] = None  # written: not kept while the weights stream
    sizes = save_family(family, folder, base=base)
    return {"chunk": chunk, "context": context, "dtype": dtype, "graphs": {k: f"{k}.onnx" for k in family},
            "weights": WEIGHTS, "embed": EMBED, "rope": ROPE, "layers": tables["layers"],
            "num_heads": tables["num_heads"], "num_kv_heads": tables["kv_heads"], "head_size": tables["head_size"],
            "hidden_size": int(hidden), "vocab_size": int(vocab),
            "weights_bytes": sizes["written"]}



# -- the export ---------------------------------------------------------------------------------
DEFAULT_CHUNK = 64
FLOAT_MASK = -1e4  # additive mask of the FP32/FP16 graphs: exact (exp underflows to 0)
QDQ_MASK = -100.0  # of the QDQ graphs: the mask sets the 16-bit range of the scores; -100 is ~0 after softmax
CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
QDQ = {"int8": ("QInt8", "A16W8"), "int4": ("QInt4", "A16W4")}
BLOCK = 64  # A16W4: one symmetric 4-bit scale per block of 64 inputs (see block_weights)


def check_options(context: int | None, chunk: int | None, calibration: str | Path | None) -> None:
    """What can be checked before any work (the model's own limits are checked once it is read)."""
    from ..errors import InvalidArgumentError

    if chunk is not None and chunk < 1:
        raise InvalidArgumentError(f"--chunk {chunk} is invalid: it must be at least 1")
    if context is not None and chunk is not None and chunk >= context:
        why = "exceeds" if chunk > context else "leaves no room to decode in"
        raise InvalidArgumentError(f"the prefill chunk of {chunk} tokens {why} the context of {context}; "
                                   "use a smaller --chunk or a larger --context")
    if calibration is not None:
        p = Path(calibration)
        if not p.is_file():
            raise InvalidArgumentError(f"calibration text {p} does not exist")
        if not p.read_text(errors="replace").strip():
            raise InvalidArgumentError(f"calibration text {p} is empty; pass a file of real text")


def _model_context(hf_dir: Path) -> int | None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    return cfg.get("max_position_embeddings")


def _calibration_ids(hf_dir: Path, path: Path, chunk: int) -> list[int]:
    from tokenizers import Tokenizer

    from ..errors import InvalidArgumentError

    ids = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(path.read_text(errors="replace")).ids
    if len(ids) < chunk + 1:
        raise InvalidArgumentError(f"calibration text {path} has {len(ids)} tokens; it needs at least {chunk + 1} "
                                   "(one prefill chunk and a decode step)")
    return ids


class Records:
    """One graph's recorded calibration inputs, kept small: each record keeps its host inputs
    (embeddings, mask, cos/sin) and its cache length L; its KV-cache inputs are rebuilt on demand
    from one snapshot of the cache per window, exactly (in a window each slot is written once, the
    slots past L are zeros: rewind zeroes them), instead of a full copy of the cache per record."""

    def __init__(self):
        self.host: list[dict[str, np.ndarray]] = []
        self.at: list[tuple[int, int]] = []  # (window, cache length)
        self.caches: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        self.names: tuple[list[str], list[str]] = ([], [])

    def __len__(self) -> int:
        return len(self.host)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        w, L = self.at[i]
        keys, values = self.caches[w]
        feeds = dict(self.host[i])
        for name, k in zip(self.names[0], keys):
            past = np.zeros_like(k)
            past[..., :L] = k[..., :L]
            feeds[name] = past
        for name, v in zip(self.names[1], values):
            past = np.zeros_like(v)
            past[:, :, :L] = v[:, :, :L]
            feeds[name] = past
        return feeds


def record_calibration(folder: Path, info: dict, ids: list[int], max_chunks: int = 4, max_windows: int = 4,
                       decode_steps: int = 16) -> dict[str, Records]:
    """Run real text through the FP32 pair with the static loop itself and keep every graph's
    inputs: prefill chunks (up to ``max_chunks`` per window of the context) then one-token decode
    steps (up to ``decode_steps``), teacher-forced on the text, in up to ``max_windows`` windows.

    One graph's session at a time (not both graphs' weights at once): every window's prefill
    chunks first, keeping its cache; then, from that cache, its decode steps. The inputs are the
    ones the interleaved loop gives (each window starts from a rewound, zeroed cache)."""
    from ..runtime.static_decoder import StaticDecoder

    spec = {"past_key": "past_key_values.%d.key", "past_value": "past_key_values.%d.value", **info}
    L = info["layers"]
    records = {g: Records() for g in GRAPHS}
    for r in records.values():
        r.names = ([spec["past_key"] % i for i in range(L)], [spec["past_value"] % i for i in range(L)])
    window = [0]

    def recorder(g, feeds):  # ``dec``: the decoder of the current pass (set below, before it runs)
        records[g].host.append({k: v for k, v in feeds.items() if not k.startswith("past_key_values.")
                                and k not in records[g].names[0] and k not in records[g].names[1]})
        records[g].at.append((window[0], dec.length))

    C, S = info["context"], info["chunk"]
    steps = min(decode_steps, C - S)
    prefill = min(max_chunks * S, C - steps) // S * S
    windows = [ids[i: i + prefill + steps] for i in range(0, len(ids), prefill + steps)]
    windows = ([w for w in windows if len(w) > S] or [ids[: prefill + steps]])[:max_windows]
    total = sum(len(w[:prefill]) // S + min(steps, len(w) - len(w[:prefill]) // S * S) for w in windows)
    with bar(total, "calibrating") as tick:
        for g in GRAPHS:
            # the one session stands in for both graphs: only graph g runs in this pass
            session = calibration_session(folder / f"{g}.onnx")
            dec = StaticDecoder(folder, info, session, session, recorder=recorder)
            for n, w in enumerate(windows):
                window[0] = n
                head = w[: len(w[:prefill]) // S * S]
                if g == "prefill":
                    dec.rewind(0)
                    for i in range(0, len(head), S):
                        dec.forward(head[i: i + S])
                        tick()
                else:  # the cache the prefill pass left for this window
                    dec.rewind(0)
                    keys, values = records["prefill"].caches.get(n, (None, None))
                    if keys is not None:
                        for dst, src in zip(dec.keys + dec.values, keys + values):
                            dst[...] = src
                    dec._length = len(head)
                    for t in w[len(head):][:steps]:
                        dec.forward([t])
                        tick()
                records[g].caches[n] = ([k.copy() for k in dec.keys], [v.copy() for v in dec.values])
            dec = session = None  # this pass's session goes before the next one opens
        # a prefill record needs the slots before it only: the window's final cache has them too
        records["prefill"].caches = records["decode"].caches
    return records


def calibration_options():
    """Session options for graphs with pre-quantized weights (static_qdq) on the CPU EP: the
    graph's own node order (priority-based, ties by node index: each DequantizeLinear sits just
    before its Gemm), so each weight's float copy is freed before the next is made, and no graph
    optimizations (their new nodes go to the end of that order), and no CPU arena (it would keep
    what the float weights took). Measured on SmolLM2-135M's decode graph: peak RSS 321 MB this
    way; 589-758 MB in the default order or with optimizations, where every DequantizeLinear (they
    read initializers only) runs first and the float model is alive at once."""
    import onnxruntime as ort

    from ..runtime.session import session_options

    so = session_options(None, True, None)
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False  # each float weight's memory goes back when it is freed
    return so


def calibration_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=calibration_options(), providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def bar(total: int, label: str):
    """A progress bar on stderr for work we do ourselves; yields tick() (nothing when quiet)."""
    done = [0]
    t0 = time.perf_counter()

    def tick(n: int = 1) -> None:
        done[0] += n
        if not progress._quiet and total:
            fill = "#" * (24 * done[0] // total)
            sys.stderr.write(f"\r    {label} [{fill:<24}] {done[0]}/{total} ({time.perf_counter() - t0:.0f}s)")
            sys.stderr.flush()
    yield tick
    if not progress._quiet and total:
        sys.stderr.write("\n")


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over recorded feeds[start:stop] (a list, or
    Records, whose feeds are rebuilt one at a time as they are read)."""

    def __init__(self, feeds, start: int = 0, stop: int | None = None):
        self.feeds, self.start = feeds, start
        self.stop = len(feeds) if stop is None else min(stop, len(feeds))
        self.i = start

    def get_next(self):
        if self.i >= self.stop:
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = self.start


class _Transposes:
    """W^T of each weight, written to ``path`` one at a time as they are made (the graphs refer to
    it by absolute location until save_family copies them into their weights file)."""

    def __init__(self, path: Path):
        self.path, self.f, self.done = path, open(path, "wb"), {}

    def add(self, w, base: str | Path):
        from onnx import TensorProto

        ext = _external(w)
        key = (ext.get("location"), ext.get("offset"), w.name) if ext else w.name
        if key not in self.done:
            a = _array(w, base)
            self.f.write(b"\0" * ((-self.f.tell()) % 64))
            self.done[key] = (self.f.tell(), a.nbytes)
            for j in range(0, a.shape[1], 4096):  # W^T's rows a slab at a time (no whole transposed copy)
                np.ascontiguousarray(a[:, j: j + 4096].T).tofile(self.f)
            del a
        offset, length = self.done[key]
        t = TensorProto(name=w.name + ".T", data_type=w.data_type, dims=list(reversed(w.dims)))
        _refer(t, str(self.path.resolve()), offset, length)
        return t

    def close(self) -> None:
        self.f.close()


def gemm_family(src: Path, dst: Path) -> dict[str, int]:
    """The Gemm form (matmuls_to_gemm) of the pair in ``src``, written to ``dst``, streaming the
    weights tensor by tensor (never a whole graph's weights in memory)."""
    import onnx

    family = {g: onnx.load(str(src / f"{g}.onnx"), load_external_data=False) for g in GRAPHS}
    sink = _Transposes(dst / "transposed.data")
    try:
        for m in family.values():
            matmuls_to_gemm(m, src, sink)
    finally:
        sink.close()
    sizes = save_family(family, dst, base=src)
    (dst / "transposed.data").unlink()
    return sizes


def matmuls_to_gemm(model, base: str | Path = "", transposes: _Transposes | None = None) -> None:
    """MatMul(x [1, S, in], W [in, out]) -> Reshape, Gemm(x, W^T [out, in], transB=1), Reshape.

    Measured on the HTP simulator: per-channel weights on a MatMul (axis 1) compute wrong
    results there (silently: every node placed, greedy tokens unrelated to the CPU's Q/DQ
    emulation), while a Gemm with per-channel weights on axis 0 matches the CPU to 16-bit noise.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.input) + list(g.output)}
    out, done = [], {}
    for n in g.node:
        w = inits.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) > 1 else None
        x_shape = shapes.get(n.input[0])
        if w is None or len(w.dims) != 2 or not x_shape or len(x_shape) != 3 or n.input[0] in inits:
            out.append(n)
            continue
        if w.name not in done:
            wt = transposes.add(w, base) if transposes is not None else \
                numpy_helper.from_array(np.ascontiguousarray(_array(w, base).T), w.name + ".T")
            g.initializer.append(wt)
            done[w.name] = wt.name
        rows, k, m = x_shape[0] * x_shape[1], int(w.dims[0]), int(w.dims[1])
        p = n.name
        s2, s3 = f"{p}/shape2d", f"{p}/shape3d"
        g.initializer.extend([numpy_helper.from_array(np.array([rows, k], np.int64), s2),
                              numpy_helper.from_array(np.array([x_shape[0], x_shape[1], m], np.int64), s3)])
        out += [helper.make_node("Reshape", [n.input[0], s2], [f"{p}/x2d"], name=f"{p}/to2d"),
                helper.make_node("Gemm", [f"{p}/x2d", done[w.name]], [f"{p}/y2d"], name=p, transB=1),
                helper.make_node("Reshape", [f"{p}/y2d", s3], [n.output[0]], name=f"{p}/to3d")]
    del g.node[:]
    g.node.extend(out)
    _prune(g)
    _check_static(model)


def qdq_config(src: Path, precision: str, ranges: dict[str, tuple[float, float]]):
    """QDQ for the NPU: 16-bit activations, MinMax, over a pair whose Gemm weights are already
    quantized (static_qdq.prequantize_family: symmetric per-channel 8- or 4-bit). The quantizer
    leaves those DequantizeLinear nodes as they are."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    # Host inputs whose full range is known: calibration text alone would clip them (an embedding
    # row it never saw, a position past its windows).
    overrides = {name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for name, (lo, hi) in ranges.items()}
    cfg = get_qnn_qdq_config(str(src), None, activation_type=QuantType.QUInt16,
                             weight_type=getattr(QuantType, QDQ[precision][0]),
                             per_channel=True, init_overrides=overrides,
                             calibration_providers=["CPUExecutionProvider"])
    cfg.op_types_to_quantize = [op for op in cfg.op_types_to_quantize if op != "DequantizeLinear"]
    cfg.use_external_data_format = True
    return cfg


def _block_size(k: int) -> int | None:
    """The block along a weight's input dimension K: BLOCK, or for a narrow K (under two blocks
    of BLOCK) the largest of 32/16 giving two blocks or more; None: K stays per-channel. (QNN's HTP
    takes 4-bit blocks that are multiples of 8.)"""
    for b in (BLOCK, 32, 16):
        if k % b == 0 and k // b >= 2:
            return b
    return None


def block_weights(model, floats: dict[str, Any], float_base: Path) -> list[int]:
    """A16W4: every 4-bit per-channel weight DequantizeLinear of a Gemm (W^T [out, in], axis 0)
    becomes block-wise: the same int4 [out, in] tensor, requantized from the FP32 weight (``floats``:
    the Gemm graph's initializers, data under ``float_base``) with one symmetric scale per block of
    the input dimension (DequantizeLinear axis 1, block_size), zero points 0. The lm_head stays
    8-bit per-channel. Returns the block sizes used, one per weight.

    Measured with onnxruntime-qnn 2.7.0 on the HTP simulator: such a Gemm places on the HTP (a
    FullyConnected with a block-quantized 4-bit weight, the 16-bit activation dequantized to FP16
    around it), the graph stays one QNN subgraph with CPU fallback disabled, and the HTP matches the
    CPU's Q/DQ emulation. Per-channel 4-bit weights are further from FP32: SmolLM2-135M's layer
    weights, relative error 0.154 per-channel vs 0.113 in blocks of 64; tiny models' logits: see
    tests/test_static_qnn.py. The Q/DQ LPBQ pattern (uint8 block scales dequantized by a per-channel
    scale, then QuantizeLinear/DequantizeLinear of the weight) is not fused by that plugin: onnxruntime
    groups the weight DequantizeLinear into the Gemm's node unit, which then fails ("Failed to get
    initializer value": its scale is not an initializer) and the graph splits.
    """
    import ml_dtypes  # onnx's own dependency: numpy_helper packs its int4 arrays
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    used = []
    for n in g.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 2 or n.input[0] not in inits:
            continue
        q, scale = inits[n.input[0]], inits.get(n.input[1])
        name = n.input[0][:-len("_quantized")] if n.input[0].endswith("_quantized") else None
        if (q.data_type != TensorProto.INT4 or len(q.dims) != 2 or scale is None or len(scale.dims) != 1
                or name not in floats or not all(c.op_type == "Gemm" and _attrs(c).get("transB") == 1
                                                 and c.input[1] == n.output[0] for c in consumers.get(n.output[0], []))):
            continue
        out, k = int(q.dims[0]), int(q.dims[1])
        block = _block_size(k)
        if block is None:
            continue
        w = _array(floats[name], float_base).astype(np.float32).reshape(out, k // block, block)
        s = np.maximum(np.abs(w).max(-1), 1e-8).astype(np.float32) / 7
        qw = np.clip(np.rint(w / s[..., None]), -8, 7).astype(np.int8)
        del w
        q.CopyFrom(numpy_helper.from_array(qw.reshape(out, k).astype(ml_dtypes.int4), q.name))
        scale.CopyFrom(numpy_helper.from_array(s, scale.name))
        zero = numpy_helper.from_array(np.zeros((out, k // block), ml_dtypes.int4), name + "_block_zero_point")
        g.initializer.append(zero)
        del n.input[2:]
        n.input.append(zero.name)
        del n.attribute[:]
        n.attribute.extend([helper.make_attribute("axis", 1), helper.make_attribute("block_size", block)])
        used.append(block)
    _prune(g)
    return used


def observe_ranges(src: Path, feeds, cfg, work: Path, batch: int = 2):
    """MinMax ranges of every tensor the config quantizes, over the recorded feeds, ``batch`` records
    at a time (each collect_data call folds its outputs into the ranges, so memory holds one batch).

    Not onnxruntime's CalibMaxIntermediateOutputs: in 1.32 it drops every full batch unobserved
    (collect_data clears them without computing their ranges; measured: logit correlation with
    FP32 0.976 instead of 0.999 on a tiny model).
    """
    import tempfile

    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    class Calibrater(MinMaxCalibrater):
        def select_tensors_to_calibrate(self, model):
            """Not the weights a DequantizeLinear makes (pre-quantized: static_qdq): their ranges
            are not needed, and as graph outputs every run would copy them all out."""
            tensors, infos = super().select_tensors_to_calibrate(model)
            return tensors - {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}, infos

        def create_inference_session(self):  # onnxruntime's (no optimizations), in node order
            import onnxruntime as ort

            self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=calibration_options(),
                                                      providers=["CPUExecutionProvider"])

    with tempfile.TemporaryDirectory(dir=work) as tmp, progress.library_output():
        # create_calibrator's steps, with its in-memory copy of the model (every weight) dropped
        # once the augmented model is written, before the session loads the weights again
        cal = Calibrater(src, cfg.op_types_to_quantize, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                               use_external_data_format=True)
        cal.augment_graph()
        cal.model = None  # MinMax's collect/compute read only the session and the output names
        _release()
        cal.create_inference_session()
        for i in range(0, len(feeds), batch):
            cal.collect_data(_Reader(feeds, i, i + batch))
        data = cal.compute_data()
        del cal
    return data


def joint_ranges(observed: list, path: Path) -> None:
    """One range per tensor name over both graphs (they share names), written as onnxruntime's
    calibration cache: the prefill and decode graphs then quantize every activation alike, so a
    speculative verification (prefill graph) and a decode step agree token for token."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    merged: dict[str, tuple] = {}
    for data in observed:
        for name in data:
            d = data[name]
            lo, hi = np.float32(np.min(d.range_value[0])), np.float32(np.max(d.range_value[1]))
            if name in merged:
                lo, hi = min(lo, merged[name][0]), max(hi, merged[name][1])
            merged[name] = (lo, hi)
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, merged), path)


def _release() -> None:
    """Hand freed memory back to the system between stages (glibc keeps freed arenas otherwise,
    and the next stage's peak stacks on them)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def quantize_graph(src: Path, dst: Path, cfg, cache: Path) -> None:
    _quantize_static(src, dst, cfg, cfg.extra_options, None, cache)


def _no_preprocess_hint(record) -> bool:
    """onnxruntime.quantization's advice to run its image-model pre-processing (shape inference
    and optimisation) does not apply to these graphs, which are already shaped and fused."""
    return "pre-processing before quantization" not in record.getMessage()


def _quantize_static(src: Path, dst: Path, cfg, extra: dict, reader, cache: Path) -> None:
    import logging

    from onnxruntime.quantization import quantize_static

    root = logging.getLogger()
    root.addFilter(_no_preprocess_hint)
    try:
        with progress.library_output():
            quantize_static(str(src), str(dst), reader, calibrate_method=cfg.calibrate_method,
                            quant_format=cfg.quant_format,
                            activation_type=cfg.activation_type, weight_type=cfg.weight_type,
                            op_types_to_quantize=cfg.op_types_to_quantize, nodes_to_quantize=cfg.nodes_to_quantize,
                            nodes_to_exclude=cfg.nodes_to_exclude, per_channel=cfg.per_channel,
                            reduce_range=cfg.reduce_range, use_external_data_format=True,
                            calibration_providers=cfg.calibration_providers, extra_options=extra,
                            calibration_cache_path=str(cache))
    finally:
        root.removeFilter(_no_preprocess_hint)


def export(hf_dir: Path, folder: Path, work: Path, profile, precision: str, context: int | None,
           chunk: int | None, calibration: str | Path | None, built: bool = False) -> dict[str, Any]:
    """Build the static pair for ``profile`` into ``folder`` (with genai_config.json and the
    tokenizer next to it); return the manifest's ``model.static`` entry. ``built``: the builder's
    FP32 CPU graph of the model is already in ``work/builder`` (streamed from a GGUF)."""
    import shutil

    from ..errors import InvalidArgumentError
    from . import builder
    from .progress import stage

    model_context = _model_context(hf_dir)
    if context and model_context and context > model_context:
        raise InvalidArgumentError(f"--context {context} is beyond the model's context of {model_context}")
    context = context or min(profile.export.get("context_length") or model_context, model_context or 1 << 30)
    chunk = chunk or max(1, min(profile.export.get("chunk") or DEFAULT_CHUNK, context - 1))
    check_options(context, chunk, calibration)
    ep = profile.export.get("execution_provider", "cpu")
    qdq = precision in QDQ
    cal_path = Path(calibration) if calibration else CALIBRATION_TEXT
    cal_ids = _calibration_ids(hf_dir, cal_path, chunk) if qdq else None
    base = work / "builder"
    if not built:
        builder.build(hf_dir, base, work / "cache", "fp32", "cpu", {})
    _release()
    genai = json.loads((base / "genai_config.json").read_text())
    dtype = "float16" if precision == "fp16" else "float32"
    plain = ep == "coreml"
    target_dir = work / "fp32" if qdq else folder
    target_dir.mkdir(parents=True, exist_ok=True)
    with stage(f"Rewriting it into static prefill ({chunk} tokens) and decode graphs over a context of {context}"):
        info = build_family(base / genai["model"]["decoder"]["filename"], genai, target_dir, chunk, context,
                            dtype, plain)
    for f in base.glob("*.onnx*"):  # the builder's graph and weights are read: disk space back
        f.unlink()
    info["mask_value"] = QDQ_MASK if qdq else FLOAT_MASK
    info["io_dtype"] = dtype
    info["plain_ops"] = plain
    if qdq:
        import resource

        import onnx

        from .static_qdq import prequantize_family

        gemm_dir, calib_dir = work / "gemm", work / "calibration"
        for d in (gemm_dir, calib_dir):
            d.mkdir()
        with stage("Quantizing the weights to 8 bits per channel for calibration"):
            gemm_family(target_dir, gemm_dir)
            (target_dir / WEIGHTS).unlink()  # the Gemm pair holds them now (disk space back)
            _release()
            prequantize_family(gemm_dir, calib_dir, "int8")
            _release()
        for f in (EMBED, ROPE):
            shutil.copy(target_dir / f, calib_dir / f)
        # the calibration loop, the observation and the quantizer hold 8-bit (or 4-bit) weights,
        # never the float model (static_qdq)
        with stage(f"Calibrating on {cal_path.name} through the static loop"):
            records = record_calibration(calib_dir, info, cal_ids)
        _release()
        table = np.load(target_dir / EMBED, mmap_mode="r")
        ranges = {"inputs_embeds": (float(table.min()), float(table.max())), "cos": (-1.0, 1.0),
                  "sin": (-1.0, 1.0), "attention_bias": (QDQ_MASK, 0.0)}
        del table
        observed = []
        for g in GRAPHS:
            with stage(f"Observing the {g} graph's activation ranges ({len(records[g])} calibration records)"):
                observed.append(observe_ranges(calib_dir / f"{g}.onnx", records[g],
                                               qdq_config(calib_dir / f"{g}.onnx", "int8", ranges), work))
            records[g] = None
            _release()
        joint_ranges(observed, work / "ranges.json")
        quant_dir = calib_dir
        if precision == "int4":  # 4-bit weights (the lm_head 8-bit), per-channel here, block-wise below
            quant_dir = work / "int4"
            quant_dir.mkdir()
            prequantize_family(gemm_dir, quant_dir, "int4")
            _release()
        quantized = {}
        for g in GRAPHS:
            with stage(f"Quantizing the {g} graph ({QDQ[precision][1]}: 16-bit activations, "
                       + ("8-bit symmetric per-channel weights)" if precision == "int8" else
                          "4-bit symmetric weights, per-channel here, block-wise next)")):
                quantize_graph(quant_dir / f"{g}.onnx", work / f"{g}.qdq.onnx",
                               qdq_config(quant_dir / f"{g}.onnx", precision, ranges), work / "ranges.json")
            _release()
        blocks: list[int] = []
        for g in GRAPHS:
            quantized[g] = onnx.load(str(work / f"{g}.qdq.onnx"), load_external_data=False)
            if precision == "int4":  # the 4-bit weights become block-wise (block_weights)
                floats = {i.name: i for i in onnx.load(str(gemm_dir / f"{g}.onnx"),
                                                        load_external_data=False).graph.initializer}
                with stage(f"Requantizing the {g} graph's 4-bit weights block-wise (blocks of up to {BLOCK})"):
                    blocks += block_weights(quantized[g], floats, gemm_dir)
                del floats
                _release()
        info["weights_bytes"] = save_family(quantized, folder, base=work)["written"]
        for f in (EMBED, ROPE):
            shutil.copy(target_dir / f, folder / f)
        info["quantization"] = {"scheme": QDQ[precision][1], "activations": "uint16", "weights": QDQ[precision][0].lower(),
                                "per_channel": True, "symmetric_weights": True, "calibration": cal_path.name,
                                "calibration_tokens": len(cal_ids), "method": "MinMax",
                                "calibrated_with": "int8 per-channel weights"}
        if blocks:  # A16W4: block-wise 4-bit weights (the 8-bit lm_head stays per-channel)
            info["quantization"].update(per_channel=False, block_size=max(blocks), block_sizes=sorted(set(blocks)))
        info["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    for f in base.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and not f.name.endswith((".onnx", ".onnx.data")) and f.name != "genai_config.json":
            shutil.copy(f, folder / f.name)
    genai["model"]["decoder"]["filename"] = "decode.onnx"
    genai["model"]["context_length"] = context
    genai["search"]["max_length"] = context
    (folder / "genai_config.json").write_text(json.dumps(genai, indent=4))
    return info


def check_ep_context(profile) -> None:
    """``--ep-context`` is for the QNN target, with onnxruntime-qnn installed (checked before any work)."""
    from ..errors import EnvironmentMismatchError, InvalidArgumentError
    from ..targets import eps

    if profile.export.get("execution_provider") != "qnn":
        raise InvalidArgumentError(f"--ep-context compiles QNN context binaries; target {profile.name} has none "
                                   "(use --target qnn)")
    entry = profile.providers[0]
    how, why = eps.availability(entry)
    if how is None:
        raise EnvironmentMismatchError(f"--ep-context needs {entry['name']} here to compile: {why}")


def compile_ep_context(folder: Path, info: dict[str, Any], profile) -> dict[str, Any]:
    """Compile each static graph into a QNN context binary (onnxruntime's EPContext model:
    ``ep.context_enable``), one per graph (a weight-shared prefill+decode binary is built on
    x86-64 but the simulator cannot load it back), with CPU fallback disabled so every node is
    in the binary. Returns the manifest's ``ep_context`` record; the runtime loads these graphs
    when it runs on that provider, the portable ones otherwise."""
    from ..provenance import package_versions
    from ..runtime.session import create_session
    from .progress import stage

    entry = profile.providers[0]
    graphs, binaries = {}, []
    for g, name in info["graphs"].items():
        ctx = folder / f"{Path(name).stem}_ctx.onnx"
        with stage(f"Compiling the {g} graph into a {entry['name'].removesuffix('ExecutionProvider')} "
                   "context binary (EPContext)"):
            create_session(folder / name, [(entry["name"], dict(entry.get("options") or {}))],
                           extra={"session.disable_cpu_ep_fallback": "1", "ep.context_enable": "1",
                                  "ep.context_file_path": str(ctx), "ep.context_embed_mode": "0"})
        if not ctx.is_file():
            raise RuntimeError(f"{entry['name']} wrote no context model for {name}")
        graphs[g] = ctx.name
        binaries += sorted(p.name for p in folder.glob(f"{ctx.stem}*.bin"))
    return {"provider": entry["name"], "options": dict(entry.get("options") or {}), "graphs": graphs,
            "binaries": binaries, "embed_mode": 0,
            "tools": package_versions(["onnxruntime", "onnxruntime-qnn"])}
