"""One builder graph + its KV cache: forward(ids) -> logits, rewind(n).

prefill, step and verify are the same call with 1..n new tokens; the graph's
GroupQueryAttention derives positions from the attention mask length.
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


class Decoder:
    def __init__(self, session: ort.InferenceSession, genai_config: dict, max_length: int,
                 device: str = "cpu", device_id: int = 0):
        self.session = session
        self.spec = cache_spec(genai_config, session)
        dec = genai_config["model"]["decoder"]
        self.input_ids_name = dec["inputs"]["input_ids"]
        self.mask_name = dec["inputs"].get("attention_mask", "attention_mask")
        self.position_name = dec["inputs"].get("position_ids", "position_ids")
        self.logits_name = dec["outputs"]["logits"]
        names = {i.name for i in session.get_inputs()}
        self.has_positions = self.position_name in names
        width = next(o.shape[-1] for o in session.get_outputs() if o.name == self.logits_name)
        # the graph's logits width: the vocabulary, or fewer columns for a restricted draft lm_head
        self.vocab_size = width if isinstance(width, int) else genai_config["model"]["vocab_size"]
        self.max_length = max_length
        self.cache = KVCache(self.spec, max_length, device, device_id)
        self.binding = session.io_binding()
        self.cache.bind(self.binding)
        self._mask = np.ones((1, max_length), dtype=np.int64)
        self._positions = np.arange(max_length, dtype=np.int64)[None, :]
        self._logits: dict[int, tuple[np.ndarray, ort.OrtValue]] = {}

    @property
    def length(self) -> int:
        return self.cache.length

    def rewind(self, length: int) -> None:
        self.cache.rewind(length)

    def _logits_buffer(self, n: int) -> np.ndarray:
        """A reusable output buffer per chunk length (decode and verify reuse theirs)."""
        buf = self._logits.get(n)
        if buf is None:
            arr = np.empty((1, n, self.vocab_size), dtype=self.spec.dtype)
            buf = (arr, ort.OrtValue.ortvalue_from_numpy(arr))
            if n <= 64:  # keep small ones (decode/verify); prompt-sized ones are transient
                self._logits[n] = buf
        self.binding.bind_ortvalue_output(self.logits_name, buf[1])
        return buf[0]

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Run ``ids`` after the cached positions; return their logits, shape [len(ids), vocab], float32."""
        n = len(ids)
        start = self.cache.length
        check_room(start, n, self.max_length, "load with a larger max_length")
        b = self.binding
        b.bind_cpu_input(self.input_ids_name, np.asarray(ids, dtype=np.int64).reshape(1, n))
        b.bind_cpu_input(self.mask_name, self._mask[:, : start + n])
        if self.has_positions:
            b.bind_cpu_input(self.position_name, self._positions[:, start : start + n])
        logits = self._logits_buffer(n)
        self.session.run_with_iobinding(b)
        self.cache.length = start + n
        out = logits[0]
        return out if out.dtype == np.float32 else out.astype(np.float32)
