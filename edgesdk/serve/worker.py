"""The one thread that owns the model: N slots, each a fork of the Model (its own KV cache over
the shared session), served round-robin one decode step at a time. HTTP handlers only submit
jobs and read their events; they never touch the model.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..runtime.tokenizer import IncrementalDecoder

log = logging.getLogger("edgesdk.serve")
PREFILL_CHUNK = 256  # prompt tokens per round: a long prompt does not stall the other slots' decoding


class QueueFull(Exception):
    pass


class LogprobRecorder:
    """Logits processor that keeps the last step's raw logits (the model's own distribution,
    before any mask or penalty); the worker reads it right after the step's token comes out."""

    def __init__(self):
        self.last: np.ndarray | None = None

    def __call__(self, logits: np.ndarray, context) -> np.ndarray:
        self.last = logits
        return logits


@dataclass
class Job:
    tokens: list[int]
    settings: dict[str, Any]
    emit: Callable[[tuple], None]  # called from the worker thread; must be thread-safe
    top_logprobs: int | None = None  # None: no logprobs
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    last_at: float | None = None  # when its last token came out
    id: int = field(default_factory=itertools.count().__next__)


class Slot:
    def __init__(self, model):
        self.model = model
        self.job: Job | None = None
        self.stream = None
        self.recorder: LogprobRecorder | None = None
        self.detok: IncrementalDecoder | None = None


class Worker:
    """Events a job receives: ("chunk", text, logprob_entries), then ("done", result) or
    ("error", exception)."""

    def __init__(self, load: Callable[[], Any], parallel: int = 1, max_queue: int = 16, metrics=None):
        self._load = load
        self.parallel = parallel
        self.max_queue = max_queue
        self.metrics = metrics
        self.model = None
        self.slots: list[Slot] = []
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._main, name="edgesdk-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull()
            self._pending.append(job)
            self._gauges()
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        with self._cond:
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                self._gauges()
            self._cond.notify()

    @property
    def busy(self) -> int:
        return sum(s.job is not None for s in self.slots)

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._pending))
            self.metrics.busy_slots.set(self.busy)

    # -- the loop --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.model = self._load()
            self.slots = [Slot(self.model)] + [Slot(self.model.fork()) for _ in range(self.parallel - 1)]
            if self.metrics:
                self.metrics.slots.set(self.parallel)
        except BaseException as e:  # reported by /health and every request
            self.load_error = e
            log.info("loading failed: %s", e)
            self.ready.set()
            return
        self.ready.set()
        while True:
            with self._cond:
                self._assign()
                while not self._stop and not self._pending and not any(s.job for s in self.slots):
                    self._cond.wait()
                    self._assign()
                if self._stop:
                    break
            for slot in self.slots:  # fair: one step per busy slot per round
                if slot.job is not None:
                    self._step(slot)
        for slot in self.slots:
            if slot.stream is not None:
                slot.stream.close()

    def _assign(self) -> None:
        """Give waiting jobs to free slots, preferring the slot whose cache shares the longest
        prefix with the job's prompt (a conversation's next turn prefills only the new part)."""
        while self._pending:
            free = [s for s in self.slots if s.job is None]
            if not free:
                break
            job = self._pending.popleft()
            slot = max(free, key=lambda s: _shared(s.model._cached, job.tokens))
            slot.job = job
            self._gauges()

    def _release(self, slot: Slot) -> None:
        slot.job = slot.stream = slot.recorder = slot.detok = None
        with self._cond:
            self._gauges()

    def _step(self, slot: Slot) -> None:
        job = slot.job
        if job.cancelled:
            if slot.stream is not None:
                slot.stream.close()
            self._release(slot)
            return
        try:
            if slot.stream is None and not self._prefill(slot):
                return  # a long prompt is prefilled a chunk per round, so other slots keep decoding
            if slot.stream is None:
                settings = dict(job.settings)
                if job.top_logprobs is not None:
                    slot.recorder = LogprobRecorder()
                    settings["logits_processors"] = [slot.recorder, *settings.get("logits_processors", ())]
                    settings["num_draft_tokens"] = 0  # the recorder holds one position: plain steps
                    slot.detok = IncrementalDecoder(slot.model.tokenizer)
                slot.stream = slot.model.stream(tokens=job.tokens, reuse_cache=True, **settings)
            chunk = next(slot.stream)
        except StopIteration:
            result = slot.stream.result
            if self.metrics:
                self.metrics.finished(result)
            job.emit(("done", result))
            self._release(slot)
            return
        except Exception as e:
            log.debug("job %s failed: %s", job.id, e)
            if slot.stream is not None:
                slot.stream.close()
            job.emit(("error", e))
            self._release(slot)
            return
        now = time.perf_counter()
        if self.metrics and chunk.token_ids:
            if job.last_at is None:
                self.metrics.ttft.observe(now - job.submitted)
            else:
                self.metrics.token_latency.observe((now - job.last_at) / len(chunk.token_ids))
            job.last_at = now
        entries = self._logprobs(slot, chunk.token_ids) if slot.recorder is not None else None
        job.emit(("chunk", chunk.text, entries))

    def _prefill(self, slot: Slot) -> bool:
        """Compute the next PREFILL_CHUNK prompt tokens into the slot's cache; True once all but
        the last prompt token are there (the stream then reuses them as a cached prefix)."""
        m, ids = slot.model, slot.job.tokens
        done = _shared(m._cached, ids[:-1])
        if len(ids) - 1 - done <= PREFILL_CHUNK:
            return True
        m.decoder.rewind(done)
        end = done + PREFILL_CHUNK
        m.decoder.forward(ids[done:end], keep=1)  # only the cache is wanted: one row of logits
        m._cached = list(ids[:end])
        return False

    def _logprobs(self, slot: Slot, token_ids: list[int]) -> list[dict]:
        """One entry per generated token: its text (they join to the detokenized output), its
        logprob and the top alternatives, from the step's raw logits."""
        entries = []
        eos = slot.model.eos_token_ids
        for t in token_ids:  # plain decoding: one token per step, so the recorder holds its logits
            if t in eos:
                continue
            x = slot.recorder.last.astype(np.float64)
            logp = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
            k = slot.job.top_logprobs
            top = []
            if k:
                idx = np.argpartition(-logp, k)[:k]
                idx = idx[np.argsort(-logp[idx])]
                tok = slot.model.tokenizer
                top = [(tok.decode([int(i)], skip_special_tokens=False), float(logp[i])) for i in idx]
            entries.append({"token": slot.detok.add([t]), "id": int(t), "logprob": float(logp[t]),
                            "top": top})
        return entries


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
