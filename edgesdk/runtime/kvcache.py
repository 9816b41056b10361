"""The KV cache: one preallocated buffer per layer, shared by the graph's past input and
present output (GroupQueryAttention writes new entries in place), so a decode step never
copies the cache. Rewinding is O(1): only the valid length changes; stale entries past it
are masked out and overwritten by the next step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort


@dataclass
class CacheSpec:
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: type  # numpy dtype of the cache (the graph's io dtype)
    past_key: str  # e.g. "past_key_values.%d.key"
    past_value: str
    present_key: str
    present_value: str


class KVCache:
    def __init__(self, spec: CacheSpec, max_length: int, device: str = "cpu", device_id: int = 0):
        self.spec = spec
        self.max_length = max_length
        shape = [1, spec.num_kv_heads, max_length, spec.head_size]
        # Allocated, not touched: resident memory grows with the tokens actually written.
        self.keys = [ort.OrtValue.ortvalue_from_shape_and_type(shape, spec.dtype, device, device_id)
                     for _ in range(spec.num_layers)]
        self.values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, spec.dtype, device, device_id)
                       for _ in range(spec.num_layers)]
        self.length = 0  # number of valid positions

    @property
    def nbytes(self) -> int:
        s = self.spec
        return 2 * s.num_layers * s.num_kv_heads * self.max_length * s.head_size * np.dtype(s.dtype).itemsize

    def bind(self, binding: ort.IOBinding) -> None:
        s = self.spec
        for i in range(s.num_layers):
            binding.bind_ortvalue_input(s.past_key % i, self.keys[i])
            binding.bind_ortvalue_output(s.present_key % i, self.keys[i])
            binding.bind_ortvalue_input(s.past_value % i, self.values[i])
            binding.bind_ortvalue_output(s.present_value % i, self.values[i])

    def rewind(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of length {self.length} to {length}")
        self.length = length
