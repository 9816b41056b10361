"""Logits for the last positions only: a ``num_logits_to_keep`` input in front of the lm_head.

The builder's lm_head turns every position's hidden state into a row of logits: a 2,048-token
prompt with a 152k vocabulary makes a [2048, 152k] float32 tensor (1.2 GB) of which plain
decoding reads one row. This rewrite slices the hidden states that feed the lm_head to the last
``n`` positions, ``n`` coming from a new graph input ``num_logits_to_keep`` (int64, shape [1]).
The input is also an initializer (an overridable initializer, IR >= 4) whose default keeps every
position, so a runtime that never feeds it (onnxruntime-genai's) still gets full logits, while
edgesdk feeds 1 for a prefill and k + 1 to verify k drafts. Values below 1 keep every position.

Only the graph changes: the .onnx is read and written without its external weights, whose
references (model.onnx.data, offsets) stay as they are.
"""
from __future__ import annotations

import json
from pathlib import Path

INPUT = "num_logits_to_keep"
KEEP_ALL = 2 ** 31 - 1  # the default: Slice clamps starts=-KEEP_ALL to the first position
MANIFEST_KEY = "logits_to_keep_input"
_LOGITS = "logits"
_MATMULS = ("MatMul", "MatMulNBits")
# ops the builder may put between the lm_head MatMul and the logits output (bias, scale, mask,
# softcap, cast); each has one input computed from the MatMul's output
_AFTER_LM_HEAD = ("Cast", "Add", "Mul", "Where", "Div", "Tanh", "Sub")


class NotApplicable(Exception):
    """The graph is not shaped like a builder decoder's lm_head; left as it is."""


def _find_lm_head(graph, producer: dict, constants: set):
    named = [n for n in graph.node if n.op_type in _MATMULS and n.name.startswith("/lm_head/MatMul")]
    if len(named) == 1:
        return named[0]
    node = producer.get(_LOGITS)
    seen = 0
    while node is not None and node.op_type not in _MATMULS and seen < 16:
        if node.op_type not in _AFTER_LM_HEAD:
            raise NotApplicable(f"the logits come from a {node.op_type} node")
        computed = [i for i in node.input if i and i not in constants and i in producer]
        if len(computed) != 1:
            raise NotApplicable(f"{node.name} combines {len(computed)} computed inputs")
        node = producer[computed[0]]
        seen += 1
    if node is None or node.op_type not in _MATMULS:
        raise NotApplicable("no lm_head MatMul found before the logits")
    return node


def rewrite(model) -> str:
    """Add the ``num_logits_to_keep`` slice to an ONNX ModelProto in place; return the input name.

    Raises NotApplicable if the graph has no builder-shaped lm_head.
    """
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    graph = model.graph
    if any(i.name == INPUT for i in graph.input):
        return INPUT  # already rewritten
    if not any(o.name == _LOGITS for o in graph.output):
        raise NotApplicable("the graph has no logits output")
    producer = {o: n for n in graph.node for o in n.output}
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    lm_head = _find_lm_head(graph, producer, constants)
    hidden = lm_head.input[0]

    # The cone: nodes downstream of the hidden states that the logits depend on. Every consumer
    # of the hidden states in it reads the sliced rows; the cone must feed nothing but the logits
    # (else other outputs would lose rows or shapes would mix).
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    ancestors, todo = set(), [producer[_LOGITS]]
    while todo:
        n = todo.pop()
        if id(n) in ancestors:
            continue
        ancestors.add(id(n))
        todo += [producer[i] for i in n.input if i in producer]
    cone, todo = {}, list(consumers.get(hidden, []))
    while todo:
        n = todo.pop()
        if id(n) in cone or id(n) not in ancestors:
            continue
        cone[id(n)] = n
        for o in n.output:
            todo += consumers.get(o, [])
    if id(lm_head) not in cone:
        raise NotApplicable("the lm_head does not reach the logits")
    outputs = {o.name for o in graph.output}
    for n in cone.values():
        for o in n.output:
            if (o in outputs and o != _LOGITS) or any(id(c) not in cone for c in consumers.get(o, [])):
                raise NotApplicable(f"{n.name}'s output {o} is used outside the lm_head")

    base = "/lm_head/keep"
    starts, ends, axes, sliced = f"{base}/Neg/output_0", f"{base}/ends", f"{base}/axes", f"{base}/Slice/output_0"
    graph.initializer.append(numpy_helper.from_array(np.array([KEEP_ALL], dtype=np.int64), INPUT))
    graph.initializer.append(numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), ends))
    graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axes))
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.INT64, [1]))
    new = [helper.make_node("Neg", [INPUT], [starts], name=f"{base}/Neg"),
           helper.make_node("Slice", [hidden, starts, ends, axes], [sliced], name=f"{base}/Slice")]
    for n in cone.values():
        for j, i in enumerate(n.input):
            if i == hidden:
                n.input[j] = sliced
    # before the first reader, so the node list stays topologically sorted
    order = list(graph.node)
    first = min(k for k, n in enumerate(order) if id(n) in cone)
    order[first:first] = new
    del graph.node[:]
    graph.node.extend(order)

    # shapes after the slice have fewer rows than the sequence: drop stale annotations
    stale = {o for n in cone.values() for o in n.output}
    kept = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    out = next(o for o in graph.output if o.name == _LOGITS)
    dims = out.type.tensor_type.shape.dim
    if len(dims) == 3:
        dims[1].Clear()
        dims[1].dim_param = "num_logits"
    if model.ir_version < 4:  # an initializer may be a graph input (overridable) from IR 4 on
        model.ir_version = 4
    return INPUT


def add_keep_input(folder: Path, model_file: str | None = None) -> dict[str, str]:
    """Rewrite ``folder``'s decoder graph (graph only, weights untouched); return the manifest
    model-section entry ({"logits_to_keep_input": name}), or {} for a graph it does not fit."""
    import onnx

    from .progress import say

    if model_file is None:
        cfg = folder / "genai_config.json"
        model_file = json.loads(cfg.read_text())["model"]["decoder"]["filename"] if cfg.is_file() else "model.onnx"
    path = folder / model_file
    model = onnx.load(str(path), load_external_data=False)
    try:
        name = rewrite(model)
    except NotApplicable as e:
        say(f"    logits stay full for every position ({e})")
        return {}
    onnx.save_model(model, str(path))
    return {MANIFEST_KEY: name}
