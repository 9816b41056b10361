"""The static prefill/decode pair + a host-side KV cache: the same contract as Decoder.

forward(ids) feeds ``ids`` in chunks of S through the prefill graph (padding the last chunk)
or, for one token, through the decode graph; both take the whole fixed-size cache as input
and return only the new keys/values, which are written into the host buffers in place (the
cache arrays are bound to the sessions once, so a step copies only its new entries). The host
computes what the graphs cannot have dynamically: the token embeddings (a memory-mapped
table), RoPE cos/sin (gathered from the builder's own caches) and the additive attention mask.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

from .decoder import check_room


def rope_tables(path: Path, head: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-position cos/sin over the full head (1 and 0 past the rotary dims), as the graph's
    ``x * cos + (x @ R) * sin`` wants them."""
    z = np.load(path)
    cos, sin, inter = z["cos"], z["sin"], bool(z["interleaved"])
    rot = 2 * cos.shape[1]
    if inter:
        cos, sin = np.repeat(cos, 2, axis=1), np.repeat(sin, 2, axis=1)
    else:
        cos, sin = np.concatenate([cos, cos], 1), np.concatenate([sin, sin], 1)
    if rot < head:
        n = cos.shape[0]
        cos = np.concatenate([cos, np.ones((n, head - rot), np.float32)], 1)
        sin = np.concatenate([sin, np.zeros((n, head - rot), np.float32)], 1)
    return cos, sin


class _Graph:
    """One session with its input/output buffers bound once."""

    def __init__(self, session: ort.InferenceSession, seq: int, spec: dict, keys, values, dtype):
        self.session, self.seq = session, seq
        C, kvh, H, group = spec["context"], spec["num_kv_heads"], spec["head_size"], \
            spec["num_heads"] // spec["num_kv_heads"]
        self.embeds = np.zeros((1, seq, spec["hidden_size"]), dtype)
        self.mask = np.zeros((1, 1, group * seq, C + seq), dtype)
        self.cos = np.zeros((1, 1, seq, H), dtype)
        self.sin = np.zeros((1, 1, seq, H), dtype)
        self.logits = np.zeros((1, seq, spec["vocab_size"]), dtype)
        self.new_keys = [np.zeros((1, kvh, H, seq), dtype) for _ in keys]
        self.new_values = [np.zeros((1, kvh, seq, H), dtype) for _ in values]
        b = self.binding = session.io_binding()
        self._held = []  # OrtValues wrap the numpy buffers (no copy); keep them alive

        def bind(name, arr, output=False):
            v = ort.OrtValue.ortvalue_from_numpy(arr)
            self._held.append(v)
            (b.bind_ortvalue_output if output else b.bind_ortvalue_input)(name, v)
        for name, arr in (("inputs_embeds", self.embeds), ("attention_bias", self.mask), ("cos", self.cos),
                          ("sin", self.sin)):
            bind(name, arr)
        bind("logits", self.logits, output=True)
        for i in range(len(keys)):
            bind(spec["past_key"] % i, keys[i])
            bind(spec["past_value"] % i, values[i])
            bind(spec["new_key"] % i, self.new_keys[i], output=True)
            bind(spec["new_value"] % i, self.new_values[i], output=True)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)


class StaticDecoder:
    """forward(ids, keep=None) -> logits [len(ids) or keep, vocab] (float32), rewind(n), length,
    max_length, vocab_size: the same contract as decoder.Decoder."""

    def __init__(self, folder: Path, spec: dict[str, Any], prefill: ort.InferenceSession,
                 decode: ort.InferenceSession, max_length: int | None = None,
                 recorder: Callable[[str, dict[str, np.ndarray]], None] | None = None):
        spec = {"past_key": "past_key_values.%d.key", "past_value": "past_key_values.%d.value",
                "new_key": "new_key_values.%d.key", "new_value": "new_key_values.%d.value", **spec}
        self.spec = spec
        self.chunk, self.context = spec["chunk"], spec["context"]
        self.max_length = min(max_length or self.context, self.context)
        self.compiled = False  # True over QNN context binaries (open_compiled)
        self.vocab_size = spec["vocab_size"]
        self.mask_value = float(spec.get("mask_value", -1e4))
        self.group = spec["num_heads"] // spec["num_kv_heads"]
        dtype = np.float16 if spec.get("io_dtype", spec.get("dtype")) == "float16" else np.float32
        self.embed = np.load(folder / spec["embed"], mmap_mode="r")
        self.cos_table, self.sin_table = rope_tables(folder / spec["rope"], spec["head_size"])
        L, kvh, H, C = spec["layers"], spec["num_kv_heads"], spec["head_size"], self.context
        self.keys = [np.zeros((1, kvh, H, C), dtype) for _ in range(L)]  # keys stored transposed
        self.values = [np.zeros((1, kvh, C, H), dtype) for _ in range(L)]
        self.graphs = {"prefill": _Graph(prefill, self.chunk, spec, self.keys, self.values, dtype),
                       "decode": _Graph(decode, 1, spec, self.keys, self.values, dtype)}
        self.session = decode
        self.recorder = recorder  # calibration: sees every graph's inputs before each run
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def rewind(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot rewind a cache of length {self._length} to {length}")
        for k, v in zip(self.keys, self.values):  # stale entries read as zeros (masked anyway)
            k[..., length:self._length] = 0
            v[:, :, length:self._length] = 0
        self._length = length

    def forward(self, ids: Sequence[int], keep: int | None = None) -> np.ndarray:
        """Run ``ids`` after the cached positions; return the logits of the last ``keep`` of them
        (None: all), shape [min(keep, len(ids)), vocab], float32. The fixed-shape graphs compute
        every position; the chunks whose rows are not kept are dropped as the prompt runs."""
        n = len(ids)
        start = self._length
        check_room(start, n, self.max_length, "export with a larger --context")
        if keep is not None and keep < 1:
            raise ValueError(f"keep={keep} is invalid: keep at least one position's logits")
        out = []
        pos = 0
        while pos < n:
            take = list(ids[pos: pos + self.chunk])
            out.append(self._step("decode" if len(take) == 1 else "prefill", take))
            pos += len(take)
            while keep is not None and len(out) > 1 and sum(len(o) for o in out[1:]) >= keep:
                out.pop(0)
        logits = out[0] if len(out) == 1 else np.concatenate(out)
        return logits if keep is None else logits[-keep:]

    def _step(self, which: str, ids: list[int]) -> np.ndarray:
        g = self.graphs[which]
        S, k, L, C = g.seq, len(ids), self._length, self.context
        g.embeds[0, :k] = self.embed[np.asarray(ids)]
        g.embeds[0, k:] = 0
        positions = np.minimum(np.arange(L, L + S), len(self.cos_table) - 1)
        g.cos[0, 0] = self.cos_table[positions]
        g.sin[0, 0] = self.sin_table[positions]
        mask = np.full((S, C + S), self.mask_value, np.float32)
        mask[:, :L] = 0  # the cached positions
        mask[:, C:] = np.where(np.tril(np.ones((S, S), bool)), 0, self.mask_value)  # causal among the new
        g.mask[0, 0] = np.tile(mask, (self.group, 1))  # rows: query head g of kv head, token s
        if self.recorder is not None:
            self.recorder(which, self._feeds(g))
        g.run()
        for i in range(len(self.keys)):
            self.keys[i][..., L:L + k] = g.new_keys[i][..., :k]
            self.values[i][:, :, L:L + k] = g.new_values[i][:, :, :k]
        self._length = L + k
        logits = g.logits[0, :k]
        return logits.astype(np.float32) if logits.dtype != np.float32 else logits.copy()

    def _feeds(self, g: _Graph) -> dict[str, np.ndarray]:
        s = self.spec
        feeds = {"inputs_embeds": g.embeds.copy(), "attention_bias": g.mask.copy(), "cos": g.cos.copy(),
                 "sin": g.sin.copy()}
        for i in range(len(self.keys)):
            feeds[s["past_key"] % i] = self.keys[i].copy()
            feeds[s["past_value"] % i] = self.values[i].copy()
        return feeds


def open_static(folder: Path, spec: dict[str, Any], decode: ort.InferenceSession,
                providers: list[tuple[str, dict[str, Any]]], threads: int | None, spinning: bool,
                max_length: int | None, extra: dict[str, str] | None = None) -> StaticDecoder:
    """The decoder of a static artifact whose decode session is open: the prefill graph gets a
    session on the same provider (the ones the decode session skipped are not tried again)."""
    from .session import create_session

    chosen = decode.get_providers()[0]
    names = [n for n, _ in providers]
    rest = providers[names.index(chosen):] if chosen in names else providers
    prefill = create_session(folder / spec["graphs"]["prefill"], rest, threads, spinning, extra=extra)
    return StaticDecoder(folder, spec, prefill, decode, max_length)


def open_compiled(folder: Path, spec: dict[str, Any], providers: list[tuple[str, dict[str, Any]]],
                  threads: int | None, spinning: bool, max_length: int | None, extra: dict[str, str] | None,
                  notes: list[str]) -> StaticDecoder | None:
    """The decoder over the artifact's compiled context binaries (``spec["ep_context"]``, from
    ``export --ep-context``) when the first provider is the one they were compiled for; None
    otherwise, or (with a note) when that provider cannot load them here: the caller then opens
    the portable graphs."""
    from ..errors import EdgeSDKError
    from .session import create_session

    ctx = spec["ep_context"]
    if not providers or providers[0][0] != ctx["provider"]:
        return None
    first = providers[:1]  # a context binary runs on its provider only
    try:
        sessions = {g: create_session(folder / name, first, threads, spinning, extra=extra)
                    for g, name in ctx["graphs"].items()}
    except EdgeSDKError as e:
        notes.append(f"could not load the compiled {ctx['provider']} context binaries ({e}); "
                     "using the portable graphs")
        return None
    decoder = StaticDecoder(folder, spec, sessions["prefill"], sessions["decode"], max_length)
    decoder.compiled = True
    return decoder
