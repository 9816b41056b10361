"""One builder graph + its KV cache: forward(ids, keep) -> logits, rewind(n).

prefill, step and verify are the same call with 1..n new tokens; the graph's
GroupQueryAttention derives positions from the attention mask length. ``keep`` asks for the
logits of the last positions only (1 for a prefill, k + 1 to verify k drafts): a graph with a
``num_logits_to_keep`` input (exporters/logits.py) then computes only those rows, and a long
input runs in chunks of PREFILL_CHUNK tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnxruntime as ort

from ..errors import ArtifactError, ContextOverflowError
from .kvcache import CacheSpec, KVCache

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def cache_spec(genai_config: dict, session: ort.InferenceSession) -> CacheSpec:
    dec = genai_config["model"]["decoder"]
    ins, outs = dec["inputs"], dec["outputs"]
    past_name = ins["past_key_names"] % 0
    types = {i.name: i.type for i in session.get_inputs()}
    if past_name not in types:
        raise ArtifactError(f"the graph has no input {past_name}; this is not a builder decoder graph")
    return CacheSpec(
        num_layers=dec["num_hidden_layers"], num_kv_heads=dec["num_key_value_heads"], head_size=dec["head_size"],
        dtype=_NP[types[past_name]], past_key=ins["past_key_names"], past_value=ins["past_value_names"],
        present_key=outs["present_key_names"], present_value=outs["present_value_names"])


def check_room(start: int, n: int, max_length: int, remedy: str) -> None:
    """Refuse a forward() of ``n`` tokens after ``start`` cached ones that the context cannot hold."""
    if n == 0:
        raise ValueError("forward() needs at least one token")
    if start + n > max_length:
        raise ContextOverflowError(f"{start + n} tokens do not fit the context of {max_length}; shorten the "
                                   f"prompt, lower max_new_tokens, or {remedy}")


PREFILL_CHUNK = 512  # prompt tokens per forward pass when only the last positions' logits are kept
MAX_KEPT_ROWS = 64  # the largest kept-logits count served from the reusable buffer (verify k + 1)
_KEEP_ALL = 2 ** 31 - 1  # the graph's own default: every position


class Decoder:
    """forward(ids, keep=None) -> logits, rewind(n), length, max_length, vocab_size.

    ``logits_to_keep``: the name of the graph's overridable ``num_logits_to_keep`` input
    (exporters/logits.py; the manifest's model.logits_to_keep_input), or None for a graph that
    computes every position's logits (older artifacts): then the rows are cut after the run.
    ``prefill_chunk``: a forward that keeps only the last logits runs longer inputs in chunks
    of this many tokens, so activations and logits stay bounded by the chunk, not the prompt.
    """

    def __init__(self, session: ort.InferenceSession, genai_config: dict, max_length: int,
                 device: str = "cpu", device_id: int = 0, logits_to_keep: str | None = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.session = session
        self.spec = cache_spec(genai_config, session)
        dec = genai_config["model"]["decoder"]
        self.input_ids_name = dec["inputs"]["input_ids"]
        self.mask_name = dec["inputs"].get("attention_mask", "attention_mask")
        self.position_name = dec["inputs"].get("position_ids", "position_ids")
        self.logits_name = dec["outputs"]["logits"]
        names = {i.name for i in session.get_inputs()}
        self.has_positions = self.position_name in names
        overridable = {i.name for i in session.get_overridable_initializers()}
        self.keep_name = logits_to_keep if logits_to_keep in overridable else None
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk} is invalid: it must be at least 1")
        self.prefill_chunk = prefill_chunk
        width = next(o.shape[-1] for o in session.get_outputs() if o.name == self.logits_name)
        # the graph's logits width: the vocabulary, or fewer columns for a restricted draft lm_head
        self.vocab_size = width if isinstance(width, int) else genai_config["model"]["vocab_size"]
        self.max_length = max_length
        self.cache = KVCache(self.spec, max_length, device, device_id)
        self.binding = session.io_binding()
        self.cache.bind(self.binding)
        self._mask = np.ones((1, max_length), dtype=np.int64)
        self._positions = np.arange(max_length, dtype=np.int64)[None, :]
        # One reusable logits buffer, grown to the largest row count kept so far (<= MAX_KEPT_ROWS),
        # with an OrtValue view per row count; larger outputs (a full prompt) are transient.
        self._rows = np.empty((1, 0, self.vocab_size), dtype=self.spec.dtype)
        self._views: dict[int, ort.OrtValue] = {}
        self._keep: dict[int, ort.OrtValue] = {}  # n -> its num_logits_to_keep value

    @property
    def length(self) -> int:
        return self.cache.length

    def rewind(self, length: int) -> None:
        self.cache.rewind(length)

    def _logits_buffer(self, rows: int) -> np.ndarray:
        """Bind an output buffer for ``rows`` rows of logits; return it."""
        if rows > MAX_KEPT_ROWS:
            arr = np.empty((1, rows, self.vocab_size), dtype=self.spec.dtype)
            self.binding.bind_ortvalue_output(self.logits_name, ort.OrtValue.ortvalue_from_numpy(arr))
            return arr
        if rows > self._rows.shape[1]:
            self._rows = np.empty((1, rows, self.vocab_size), dtype=self.spec.dtype)
            self._views.clear()
        view = self._views.get(rows)
        if view is None:
            view = self._views[rows] = ort.OrtValue.ortvalue_from_numpy(self._rows[:, :rows])
        self.binding.bind_ortvalue_output(self.logits_name, view)
        return self._rows[:, :rows]

    def forward(self, ids: Sequence[int], keep: int | None = None) -> np.ndarray:
        """Run ``ids`` after the cached positions; return the logits of the last ``keep`` of them
        (None: all), shape [min(keep, len(ids)), vocab], float32.

        The returned array may be a view of a buffer the next forward() overwrites.
        """
        n = len(ids)
        check_room(self.cache.length, n, self.max_length, "load with a larger max_length")
        if keep is not None and keep < 1:
            raise ValueError(f"keep={keep} is invalid: keep at least one position's logits")
        rows = n if keep is None else min(keep, n)
        if rows < n and n > self.prefill_chunk:
            # the last piece holds the kept rows; the ones before it keep one row each (discarded)
            last = max(rows, n % self.prefill_chunk or self.prefill_chunk)
            for i in range(0, n - last, self.prefill_chunk):
                self._run(ids[i: min(i + self.prefill_chunk, n - last)], 1)
            ids = ids[n - last:]
        return self._run(ids, rows)

    def _run(self, ids: Sequence[int], rows: int) -> np.ndarray:
        n = len(ids)
        start = self.cache.length
        b = self.binding
        b.bind_cpu_input(self.input_ids_name, np.asarray(ids, dtype=np.int64).reshape(1, n))
        b.bind_cpu_input(self.mask_name, self._mask[:, : start + n])
        if self.has_positions:
            b.bind_cpu_input(self.position_name, self._positions[:, start : start + n])
        if self.keep_name is not None:
            computed = rows
            # an overridable initializer: IOBinding takes it as an OrtValue only (bind_cpu_input
            # looks it up among the graph's plain inputs and fails)
            b.bind_ortvalue_input(self.keep_name, self._keep_value(_KEEP_ALL if rows == n else rows))
        else:
            computed = n  # an older graph: every position's logits, cut below
        logits = self._logits_buffer(computed)
        self.session.run_with_iobinding(b)
        self.cache.length = start + n
        out = logits[0, computed - rows:]
        if out.dtype != np.float32:
            return out.astype(np.float32)
        # rows cut from a transient prompt-sized buffer: copy them, so the buffer is freed now
        return out.copy() if rows < computed > MAX_KEPT_ROWS else out

    def _keep_value(self, rows: int) -> ort.OrtValue:
        value = self._keep.get(rows)
        if value is None:
            value = ort.OrtValue.ortvalue_from_numpy(np.array([rows], dtype=np.int64))
            if rows <= MAX_KEPT_ROWS or rows == _KEEP_ALL:
                self._keep[rows] = value
        return value
