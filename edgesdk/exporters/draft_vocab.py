"""A draft model's lm_head restricted to the tokens it is likely to propose.

A small draft spends a large share of each step on its lm_head (Qwen2.5-0.5B: 136M of 494M
weights for a 151,936-token vocabulary). A draft only proposes; the target checks every token,
so dropping rare tokens from the draft's lm_head costs acceptance only where the target picks a
dropped token, and never changes the output (FR-Spec, Zhao et al. 2025). Tokens are ranked by
their frequency in the texts given (ties and unseen tokens by id: byte-level BPE assigns ids in
merge order, a rough frequency order); special tokens are always kept.

The graph's logits then have one column per kept token; ``lm_head_tokens.npy`` in the artifact
maps column j to token id, and the runtime scatters draft logits back to the full vocabulary.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InvalidArgumentError
from .progress import say

TOKENS_FILE = "lm_head_tokens.npy"


def rank(folder: Path, size: int, texts: Sequence[str | os.PathLike] = ()) -> np.ndarray:
    """The ``size`` token ids to keep (sorted), from the artifact's tokenizer and ``texts``."""
    import json

    from tokenizers import Tokenizer

    vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]
    if not 0 < size < vocab:
        raise InvalidArgumentError(f"--draft-vocab {size} is invalid: it must be between 1 and the vocabulary "
                                   f"size ({vocab}) minus one")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    counts = np.zeros(vocab, dtype=np.int64)
    for t in texts:  # export() checked that they exist, before building
        ids = np.asarray(tok.encode(Path(t).read_text(encoding="utf-8", errors="replace")).ids, dtype=np.int64)
        np.add.at(counts, ids[ids < vocab], 1)
    special = sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special and i < vocab)
    if len(special) >= size:
        raise InvalidArgumentError(f"--draft-vocab {size} is too small: the tokenizer has {len(special)} special tokens")
    order = np.lexsort((np.arange(vocab), -counts))  # most frequent first, then by id
    order = order[~np.isin(order, special)]
    keep = np.concatenate([np.asarray(special, dtype=np.int64), order[: size - len(special)]])
    return np.sort(keep).astype(np.int32)


def restrict(folder: Path, token_ids: np.ndarray, model_file: str = "model.onnx") -> None:
    """Keep only the ``token_ids`` rows of the lm_head of ``folder/model_file``; write the map."""
    import onnx
    from onnx import helper, numpy_helper

    from .builder import drop_unused_initializers, save_graph

    path = folder / model_file
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    node = next((n for n in graph.node if "logits" in n.output), None)
    if node is None or node.op_type not in ("MatMulNBits", "MatMul"):
        raise InvalidArgumentError("this graph's logits do not come straight from an lm_head matmul; "
                                   "--draft-vocab cannot restrict it")
    ids = np.asarray(token_ids, dtype=np.int64)
    users = {i for n in graph.node if n is not node for i in n.input}

    def replace(name: str, array: np.ndarray) -> str:
        """A new initializer when another node shares ``name`` (a tied embedding), else in place."""
        if name in users:
            name = name + ".draft_rows"
            graph.initializer.append(numpy_helper.from_array(array, name))
        else:
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
        return name

    if node.op_type == "MatMulNBits":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n = int(attrs["N"])
        for i in (1, 2, 3):
            if i < len(node.input) and node.input[i]:
                a = numpy_helper.to_array(inits[node.input[i]])
                a = a.reshape(n, -1)[ids].reshape((len(ids),) + a.shape[1:]) if a.shape[0] == n else \
                    a.reshape(n, -1)[ids].reshape(-1)
                node.input[i] = replace(node.input[i], a)
        for a in node.attribute:
            if a.name == "N":
                a.i = len(ids)
    else:
        w = numpy_helper.to_array(inits[node.input[1]])
        node.input[1] = replace(node.input[1], np.ascontiguousarray(w[:, ids]))
    out = next(o for o in graph.output if o.name == "logits")
    out.type.tensor_type.shape.dim[-1].Clear()
    out.type.tensor_type.shape.dim[-1].dim_value = len(ids)
    drop_unused_initializers(graph)
    save_graph(model, path)
    np.save(folder / TOKENS_FILE, np.asarray(token_ids, dtype=np.int32))
    say(f"    lm_head keeps {len(ids)} tokens (draft use only)")
