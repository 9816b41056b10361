"""INT4 from a Hugging Face folder (safetensors: F32, F16, BF16), one tensor at a time.

The old path had transformers load the whole model and the builder keep every weight in float32
until its quantizer ran: peak memory many times the artifact. Here, as in gguf_stream, the
builder makes the graph from a transformers model on the meta device whose 1-D tensors (norm
weights, q/k/v biases) are real; its float graph is taken before it would quantize anything.
Every MatMul with a constant weight then becomes a MatMulNBits whose initializers are lazy:
``onnx_ir.save`` reads each weight's rows from the safetensors files, quantizes them with ONNX
Runtime's MLAS quantizer and writes them before the next weight is read.

The result is what the builder's own int4 pass makes (its DEFAULT method: MLAS, with the
profile's block size, accuracy level and symmetry): a tied embedding becomes a
GatherBlockQuantized over lm_head's bytes, an untied one stays a float Gather. Anything else
(other quantization settings, architectures, weight formats) raises ``Unsupported``: the caller
then takes the old path.

The files are read with plain reads, not mmap (safetensors' safe_open maps the whole file: every
page touched would count in the process's resident memory until it is closed).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import SourceError
from .gguf_repack import _hf_modules
from .gguf_stream import Unsupported, _hushed, build_graph, check_materialized, save_float_graph, save_streamed
from .progress import stage, ticking
from .static import _release

# HF model_type values whose weights map onto the builder's graph one to one (as for GGUF)
STREAMING = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM"}
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16: the upper halves of float32s
_CHUNK_FLOATS = 1 << 22  # float32 values read and quantized at a time (16 MB, and the transposed copy)

__all__ = ["STREAMING", "Unsupported", "export", "export_float"]


class _Safetensors:
    """The tensors of a folder's *.safetensors files by name, read row by row as float32."""

    def __init__(self, folder: Path):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise Unsupported("its weights are not in safetensors files")
        index = folder / "model.safetensors.index.json"
        if index.is_file():  # a sharded checkpoint: only the shards the index names
            try:
                names = set(json.loads(index.read_text())["weight_map"].values())
            except (ValueError, KeyError, AttributeError):
                raise Unsupported(f"{index.name} is not a safetensors index") from None
            files = [folder / n for n in sorted(names)]
        self.tensors: dict[str, tuple[Path, str, tuple[int, ...], int]] = {}
        for f in files:
            size = f.stat().st_size if f.is_file() else 0
            try:
                with open(f, "rb") as fh:
                    n = int.from_bytes(fh.read(8), "little")
                    if not 2 <= n <= (1 << 28):
                        raise ValueError("bad header size")
                    header = json.loads(fh.read(n))
            except (OSError, ValueError) as e:  # neither path could read it
                raise SourceError(f"{f} is not a readable safetensors file ({str(e)[:100]})") from None
            start = 8 + n
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                if dtype not in _DTYPES:
                    raise Unsupported(f"{name} is stored as {dtype}; streaming reads F32, F16 and BF16")
                if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize:
                    raise SourceError(f"{f}: {name}'s size does not match its shape (corrupt file)")
                if start + end > size:
                    raise SourceError(f"{f} is truncated: {name} ends past its end")
                self.tensors[name] = (f, dtype, shape, start + begin)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][2]

    def dtype(self, name: str) -> str:
        return self.tensors[name][1]

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of the tensor (all of a 1-D one) as float32."""
        path, dtype, shape, offset = self.tensors[name]
        stop = shape[0] if stop is None else stop
        per_row = int(np.prod(shape[1:], dtype=np.int64))
        raw_dtype = np.dtype(_DTYPES[dtype])
        out = np.empty((stop - start) * per_row, np.float32)
        step = max(1, _CHUNK_FLOATS // per_row) * per_row  # converted a slice at a time into ``out``
        with open(path, "rb") as f:
            f.seek(offset + start * per_row * raw_dtype.itemsize)
            for i in range(0, out.size, step):
                a = np.fromfile(f, raw_dtype, min(step, out.size - i))
                if a.size != min(step, out.size - i):
                    raise SourceError(f"{path} is truncated ({name})")
                out[i:i + a.size] = (a.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else a
        return out.reshape((stop - start,) + shape[1:])


def _quantize(src: _Safetensors, names: list[str], k: int, block: int, symmetric: bool) -> dict[str, np.ndarray]:
    """MatMulNBits' B, scales (and zero points) for the weights ``names`` ([N_i, K] each,
    stacked along N), as the builder's quantizer (MLAS, DefaultWeightOnlyQuantizer) makes them:
    the float rows are read and quantized a slice at a time."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n = sum(src.shape(m)[0] for m in names)
    nb, blob = k // block, block // 2
    out = {"B": np.empty((n, nb, blob), np.uint8), "scales": np.empty((n, nb), np.float32),
           "zp": np.empty((n, -(-nb // 2)), np.uint8)}
    step = max(1, _CHUNK_FLOATS // k)
    row = 0
    for name in names:
        rows = src.shape(name)[0]
        for r in range(0, rows, step):
            w = src.rows(name, r, min(rows, r + step))
            m = w.shape[0]
            pb, ps = np.zeros((m, nb, blob), np.uint8), np.zeros((m, nb), np.float32)
            pz = np.zeros((m, out["zp"].shape[1]), np.uint8)
            quantize_matmul_4bits(pb, np.ascontiguousarray(w.T), ps, pz, block, m, k, symmetric)
            out["B"][row:row + m], out["scales"][row:row + m], out["zp"][row:row + m] = pb, ps, pz
            row += m
            del w
    return out


class _Packed:
    """One MatMul's packed arrays at a time: its B, scales and zero points are written one after
    the other, then the next MatMul's are computed."""

    def __init__(self, src: _Safetensors, block: int, symmetric: bool):
        self.src, self.block, self.symmetric = src, block, symmetric
        self.key: tuple | None = None
        self.value: dict[str, np.ndarray] = {}

    def get(self, names: list[str], k: int, what: str) -> np.ndarray:
        key = (tuple(names), k)
        if self.key != key:
            self.key, self.value = None, {}
            self.value = _quantize(self.src, names, k, self.block, self.symmetric)
            self.key = key
        return self.value[what]


def _meta_model(src):
    """The safetensors of ``src.hf_dir`` and a meta-device transformers model of it whose 1-D
    parameters (norm weights, biases) hold their real values."""
    if src.model_type not in STREAMING or src.architecture != STREAMING[src.model_type]:
        raise Unsupported(f"streaming covers {', '.join(STREAMING.values())}, not {src.architecture}")
    hf_dir = Path(src.hf_dir)
    config_dict = json.loads((hf_dir / "config.json").read_text())
    if config_dict.get("quantization_config"):
        raise Unsupported("its weights are already quantized (quantization_config)")
    weights = _Safetensors(hf_dir)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with _hushed():
        config = AutoConfig.from_pretrained(hf_dir)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, p in list(meta.named_parameters(remove_duplicate=False)):
        if name == "lm_head.weight" and tied:  # transformers ties it to the embedding, whatever the file holds
            name = "model.embed_tokens.weight"
        if name not in weights:
            raise Unsupported(f"no safetensors tensor holds {name}")
        if tuple(weights.shape(name)) != tuple(p.shape):
            raise Unsupported(f"{name} is {list(weights.shape(name))} in the safetensors, {list(p.shape)} in the model")
        if p.ndim == 1:  # norm weights, biases: real values, so the builder reads them as usual
            module, leaf = meta.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(module, leaf, torch.nn.Parameter(torch.from_numpy(weights.rows(name)), requires_grad=False))
    return hf_dir, weights, meta, tied


def export_float(src, out_dir: Path, work: Path) -> Path:
    """The builder's FP32 CPU graph of the HF folder ``src.hf_dir`` in ``out_dir`` (model.onnx(.data),
    genai_config.json, tokenizer files), each weight read from the safetensors as it is written:
    what the builder makes from transformers' float32 model, without that model in memory (the
    static recipe's source graph). Returns the folder."""
    hf_dir, weights, meta, tied = _meta_model(src)
    with stage("Building the float graph with onnxruntime-genai's model builder"), ticking("building"):
        captured = build_graph(meta, hf_dir, out_dir, work, "cpu", {})

    def parts_of(module: str) -> list[str]:
        names = ["model.embed_tokens.weight" if m == "lm_head" and tied else f"{m}.weight" for m in _hf_modules(module)]
        if any(m not in weights for m in names):
            raise Unsupported(f"no safetensors tensors hold {module}'s weight")
        return names

    def floats(names: list[str], shape: tuple[int, int], transpose: bool) -> np.ndarray:
        a = np.concatenate([weights.rows(m) for m in names]) if len(names) > 1 else weights.rows(names[0])
        if a.shape[:: -1 if transpose else 1] != shape:
            raise Unsupported(f"the safetensors tensors {', '.join(names)} are not {list(shape)}")
        return np.ascontiguousarray(a.T if transpose else a, np.float32)

    save_float_graph(captured.pop("model"), out_dir / captured["filename"], parts_of, floats, "safetensors",
                     "Writing the weights as float32")
    _release()
    return hf_dir


def export(src, out_dir: Path, work: Path, execution_provider: str, options: dict[str, str]) -> tuple[Path, dict]:
    """Write ``out_dir``'s model.onnx(.data), genai_config.json and tokenizer files from the HF
    folder ``src.hf_dir``, one weight at a time. Returns the folder and the streaming report."""
    hf_dir, weights, meta, tied = _meta_model(src)

    def check(builder) -> None:
        q = builder.quant_attrs
        if (getattr(builder, "quantization_algo", "default") != "default" or int(q["bits"]) != 4 or q.get("use_qdq")
                or q.get("nodes_to_exclude") or getattr(builder, "int4_customized_weight_config", None)
                or getattr(builder, "matmul_mixed_precision", None) or getattr(builder, "quant_type", None) is not None):
            raise Unsupported("the profile asks for int4 settings other than MLAS round-to-nearest")

    with stage(f"Building the int4 graph for {execution_provider} with onnxruntime-genai's model builder"), \
            ticking("building"):
        captured = build_graph(meta, hf_dir, out_dir, work, execution_provider, options, check)
    model = captured.pop("model")
    packed, report = _rewrite(model, weights, tied, captured)
    save_streamed(model, out_dir / captured["filename"], "Quantizing the weights one at a time")
    packed.key, packed.value = None, {}  # the last weight's arrays; the graph's lazy tensors refer to them
    del model
    _release()  # the graph's reference cycles and freed heap, before the caller checks the artifact
    return hf_dir, report


def _rewrite(model, weights: _Safetensors, tied: bool, settings: dict) -> tuple[_Packed, dict]:
    import onnx_ir as ir

    graph = model.graph
    block, symmetric = settings["block_size"], settings["symmetric"]
    packed = _Packed(weights, block, symmetric)
    made: set[str] = set()
    dtypes: dict[str, int] = {}

    def lazy(name: str, compute, dtype, shape) -> ir.Value:
        def tensor() -> ir.Tensor:
            a = np.ascontiguousarray(compute())
            if a.shape != tuple(shape) or ir.DataType.from_numpy(a.dtype) != dtype:
                raise AssertionError(f"{name}: computed {a.dtype}{list(a.shape)}, the graph says {dtype}{list(shape)}")
            return ir.Tensor(a, name=name)
        t = ir.LazyTensor(tensor, dtype=dtype, shape=ir.Shape(shape), name=name)
        v = ir.Value(name=name, shape=t.shape, type=ir.TensorType(t.dtype), const_value=t)
        graph.register_initializer(v)
        made.add(name)
        return v

    def source(module: str) -> str:
        name = f"{module}.weight"
        if name == "lm_head.weight" and tied:
            return "model.embed_tokens.weight"
        if name not in weights:
            raise Unsupported(f"no safetensors tensor holds {name}")
        return name

    lm_head = None
    count = 0
    for n in list(graph):
        if n.op_type != "MatMul" or n.inputs[1] is None or n.inputs[1].const_value is None:
            continue
        old = n.inputs[1]
        wname = old.name
        if not wname.endswith(".MatMul.weight"):
            raise Unsupported(f"cannot map the MatMul weight {wname} to safetensors tensors")
        if old.const_value.dtype != ir.DataType.FLOAT:
            raise Unsupported(f"the graph's weights are {old.const_value.dtype}, not float32")
        base = wname[: -len(".weight")]
        names = [source(m) for m in _hf_modules(wname[: -len(".MatMul.weight")])]
        k, n_total = (int(d) for d in old.const_value.shape)
        if any(len(weights.shape(m)) != 2 or weights.shape(m)[1] != k for m in names) \
                or sum(weights.shape(m)[0] for m in names) != n_total:
            raise Unsupported(f"the safetensors tensors of {wname} do not have its shape [{k}, {n_total}]")
        if k % block:
            raise Unsupported(f"{wname}: K={k} is not a multiple of the block size {block}")
        nb = k // block
        ins = [lazy(f"{base}.weight_Q4", lambda names=names, k=k: packed.get(names, k, "B"), ir.DataType.UINT8,
                    (n_total, nb, block // 2)),
               lazy(f"{base}.weight_scales", lambda names=names, k=k: packed.get(names, k, "scales"), ir.DataType.FLOAT,
                    (n_total, nb))]
        if not symmetric:
            ins.append(lazy(f"{base}.weight_zp", lambda names=names, k=k: packed.get(names, k, "zp"),
                            ir.DataType.UINT8, (n_total, -(-nb // 2))))
        n.op_type, n.domain = "MatMulNBits", "com.microsoft"
        n.resize_inputs(len(ins) + 1)
        for i, v in enumerate(ins, 1):
            n.replace_input_with(i, v)
        n.attributes.clear()
        for a, val in (("K", k), ("N", n_total), ("bits", 4), ("block_size", block),
                       ("accuracy_level", settings["accuracy_level"])):
            n.attributes[a] = ir.AttrInt64(a, val)
        n.name = f"{n.name}_Q4"  # the builder's quantizer's names
        graph.initializers.pop(old.name)
        for m in names:
            dtypes[weights.dtype(m)] = dtypes.get(weights.dtype(m), 0) + 1
        count += 1
        if wname == "lm_head.MatMul.weight":
            lm_head = (base, names, k, n_total)

    gathers = [n for n in graph if n.op_type == "Gather" and n.inputs[0] is not None
               and n.inputs[0].name == "model.embed_tokens.weight"]
    if len(gathers) != 1:
        raise Unsupported(f"expected one embedding Gather, found {len(gathers)}")
    gather, table = gathers[0], gathers[0].inputs[0]
    vocab, hidden = (int(d) for d in table.shape)
    if tied:  # GatherBlockQuantized over lm_head's bytes, as the builder's shared_embeddings makes it
        if lm_head is None or lm_head[1] != ["model.embed_tokens.weight"]:
            raise Unsupported("tied embeddings without a lm_head MatMul over them")
        base = lm_head[0]
        shape = ir.tensor(np.array([vocab, hidden // 2], np.int64), name=f"{base}.weight_Q4.shape")
        flat = ir.Value(name=shape.name, shape=shape.shape, type=ir.TensorType(shape.dtype), const_value=shape)
        graph.register_initializer(flat)
        made.add(flat.name)
        reshape = ir.node("Reshape", [graph.initializers[f"{base}.weight_Q4"], flat],
                          name="/model/embed_tokens/Reshape", num_outputs=1)
        reshape.outputs[0].name = "/model/embed_tokens/Reshape/output_0"
        graph.insert_before(gather, [reshape])
        ins = [reshape.outputs[0], gather.inputs[1], graph.initializers[f"{base}.weight_scales"]]
        if not symmetric:
            ins.append(graph.initializers[f"{base}.weight_zp"])
        gather.op_type, gather.domain = "GatherBlockQuantized", "com.microsoft"
        gather.resize_inputs(len(ins))
        for i, v in enumerate(ins):
            gather.replace_input_with(i, v)
        gather.attributes.clear()
        for a, val in (("bits", 4), ("block_size", block), ("gather_axis", 0), ("quantize_axis", 1)):
            gather.attributes[a] = ir.AttrInt64(a, val)
        gather.name = "/model/embed_tokens/GatherBlockQuantized"
        graph.initializers.pop(table.name)
        embedding = "GatherBlockQuantized 4-bit, shared with lm_head"
    else:  # the builder keeps an untied embedding in float32
        if table.const_value is None or table.const_value.dtype != ir.DataType.FLOAT:
            raise Unsupported("the embedding table is not a float32 initializer")
        table.const_value = ir.LazyTensor(lambda: weights.rows("model.embed_tokens.weight"), dtype=ir.DataType.FLOAT,
                                          shape=ir.Shape([vocab, hidden]), name=table.name)
        made.add(table.name)
        kind = weights.dtype("model.embed_tokens.weight")
        dtypes[kind] = dtypes.get(kind, 0) + 1
        embedding = "Gather float32"

    check_materialized(graph, made, "safetensors")
    report = {"from": "safetensors", "matmulnbits": count, "source_dtypes": dict(sorted(dtypes.items())),
              "embedding": embedding}
    return packed, report
