"""The builder recipe: onnxruntime-genai's model builder makes the graph
(GroupQueryAttention, MatMulNBits, fused norms) from an HF folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import EdgeSDKError
from .progress import library_output, stage

# onnxruntime-genai builder option names for the profile's quantization settings
_QUANT_KEYS = {"block_size": "block_size", "accuracy_level": "accuracy_level", "symmetric": "is_symmetric"}


def builder_options(precision: str, export_profile: dict[str, Any]) -> dict[str, str]:
    opts: dict[str, str] = {}
    q = export_profile.get(precision) or {}
    for key, name in _QUANT_KEYS.items():  # (gguf_blocks is edgesdk's own step: gguf_repack)
        if key in q:
            opts[name] = str(q[key]).lower() if isinstance(q[key], bool) else str(q[key])
    algo = q.get("algorithm")
    if algo and algo != "rtn":  # the builder's default algorithm is RTN
        opts["algo_config"] = algo
    if q.get("mixed_precision"):
        opts["matmul_mixed_precision"] = q["mixed_precision"]
    for k, v in (export_profile.get("builder_options") or {}).items():
        opts[k] = str(v)
    return opts


def build(hf_dir: Path, out_dir: Path, cache_dir: Path, precision: str, execution_provider: str,
          options: dict[str, str]) -> None:
    try:
        import onnx_ir  # noqa: F401  (the builder needs it but does not declare it)
        from onnxruntime_genai.models.builder import create_model, parse_extra_options
    except ImportError as e:
        raise EdgeSDKError(f"exporting needs the export extra ({e.name} is missing): "
                           "pip install 'edgesdk[export]'") from None
    kv = [f"{k}={v}" for k, v in options.items()]
    with stage(f"Building the {precision} graph for {execution_provider} with onnxruntime-genai's model builder"):
        layers = json.loads((hf_dir / "config.json").read_text()).get("num_hidden_layers", 0)
        verb = f"quantizing to {precision}" if precision in ("int4", "int8") else f"converting to {precision}"
        with library_output(layers, verb):
            extra = parse_extra_options(None, str(hf_dir), str(out_dir), precision, execution_provider,
                                        str(cache_dir), kv)
            if "hf_details" in extra:
                _flatten_rope(extra["hf_details"]["hf_config"])
            create_model(None, str(hf_dir), str(out_dir), precision, execution_provider, str(cache_dir), **extra)


def _flatten_rope(config) -> None:
    """transformers 5 nests RoPE settings per layer type (Gemma 3: full/sliding attention); the
    builder reads the flat form (rope_parameters for global layers, rope_local_base_freq)."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp and "rope_type" not in rp:
        full, local = rp["full_attention"], rp.get("sliding_attention", rp["full_attention"])
        config.rope_parameters = dict(full)
        config.rope_theta = full["rope_theta"]
        config.rope_local_base_freq = local["rope_theta"]


def graph_io(model_path: Path) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Inputs, outputs (name, dtype, shape) and op-type counts of a graph, without its weights."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)

    def describe(vi) -> dict:
        t = vi.type.tensor_type
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return [describe(i) for i in m.graph.input], [describe(o) for o in m.graph.output], ops


def cap_context(out_dir: Path, context_length: int | None) -> None:
    if context_length:
        path = out_dir / "genai_config.json"
        cfg = json.loads(path.read_text())
        cfg["model"]["context_length"] = min(context_length, cfg["model"]["context_length"])
        cfg["search"]["max_length"] = cfg["model"]["context_length"]
        path.write_text(json.dumps(cfg, indent=4))


def write_runtime_options(out_dir: Path, providers: list[dict[str, Any]], threads: int | None) -> dict:
    """Put the profile's provider options (and thread count) into genai_config.json, so that
    onnxruntime-genai's own runtimes make the same choice edgesdk's does.

    The builder writes its graph-specific options (e.g. DML graph capture) for the EP it built
    for; the profile's options are merged over them, in the profile's order, CPU left out
    (genai always has it). Provider names are genai's short ones ("dml", "cuda", "qnn").
    """
    from ..targets.eps import KNOWN, option_strings

    path = out_dir / "genai_config.json"
    cfg = json.loads(path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    built: dict[str, dict[str, str]] = {}
    for entry in so.get("provider_options") or []:
        built.update(entry)
    merged: dict[str, dict[str, str]] = {}
    for p in providers:
        short = KNOWN[p["name"]].short if p["name"] in KNOWN else ""
        if not short or short == "cpu":
            continue
        merged.setdefault(short, dict(built.get(short, {})))
        merged[short].update(option_strings(p.get("options")))
    for short, opts in built.items():  # keep what the builder wrote even if the profile lacks it
        merged.setdefault(short, opts)
    so["provider_options"] = [{k: v} for k, v in merged.items()]
    if threads:
        so["intra_op_num_threads"] = int(threads)
    path.write_text(json.dumps(cfg, indent=4))
    return cfg


def save_graph(model, path: Path) -> None:
    """Write a fully loaded ONNX model back over ``path`` with all weights in ``path.data``."""
    import onnx

    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    data.chmod(0o644)  # onnx creates it owner-only


def drop_unused_initializers(graph) -> None:
    """Remove the initializers no node reads any more (after a graph rewrite)."""
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
