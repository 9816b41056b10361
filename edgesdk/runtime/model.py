"""Model: an artifact loaded for inference. ``edgesdk.load`` returns one."""
from __future__ import annotations

import logging
import os
import time
import weakref
from pathlib import Path
from typing import Any, Iterator, Sequence

from .. import artifact as _artifact
from ..errors import ContextOverflowError, InvalidArgumentError, ModelBusyError
from .decoder import Decoder
from .generate import Driver, GenerationChunk, GenerationConfig, GenerationResult, plain_tokens
from .session import create_session
from .tokenizer import Tokenizer

log = logging.getLogger("edgesdk")


class Model:
    def __init__(self, art: _artifact.Artifact, providers: list[tuple[str, dict[str, Any]]],
                 notes: list[str] | None = None, max_length: int | None = None,
                 threads: int | None = None, spinning: bool = True, draft: "Model | str | None" = None,
                 strict: bool = False):
        t0 = time.perf_counter()
        self.artifact = art
        self.manifest = art.manifest
        self.path = art.path
        genai = art.genai_config
        context = genai["model"]["context_length"]
        if max_length is not None and not 1 < max_length:
            raise InvalidArgumentError(f"max_length={max_length} is invalid: it must be > 1")
        # A sliding-window graph needs room for its window (GQA's local_window_size).
        window = (genai["model"]["decoder"].get("sliding_window") or {}).get("window_size") or 0
        self.max_length = min(max(max_length or context, window), context)
        self.provider_notes = list(notes or [])  # create_session adds the providers it had to skip
        static = self.manifest["model"].get("static")
        # strict on a static (NPU) artifact: every node on the accelerator, or a one-line error naming
        # the first one it refuses (its graphs are made to place wholly)
        extra = ({"session.disable_cpu_ep_fallback": "1"}
                 if strict and static and providers[0][0] != "CPUExecutionProvider" else None)
        compiled = None
        if static and static.get("ep_context"):  # QNN context binaries, when running on QNN
            from .static_decoder import open_compiled

            compiled = open_compiled(art.path, static, providers, threads, spinning, self.max_length, extra,
                                     self.provider_notes)
        self.session = compiled.graphs["decode"].session if compiled else create_session(
            art.model_path, providers, threads, spinning, extra=extra, notes=self.provider_notes)
        self.providers = self.session.get_providers()
        device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self._device = device
        if compiled:
            self.decoder = compiled
        elif static:  # an NPU/CoreML artifact: model_path is its decode graph; the prefill graph joins it
            from .static_decoder import open_static

            self.decoder = open_static(art.path, static, self.session, providers, threads, spinning,
                                       self.max_length, extra=extra)
        else:
            self.decoder = Decoder(self.session, genai, self.max_length, device=device,
                                   logits_to_keep=self.manifest["model"].get("logits_to_keep_input"))
        self.tokenizer = Tokenizer(art.path)
        gen = self.manifest.get("generation", {})
        self.eos_token_ids = set(gen.get("eos_token_ids") or [])
        # a draft-only artifact (export --draft-vocab): logits column j is token lm_head_tokens[j]
        restricted = self.manifest["model"].get("lm_head_tokens")
        self.lm_head_tokens = None
        if restricted:
            import numpy as np

            self.lm_head_tokens = np.load(art.path / restricted["file"])
        self._cached: list[int] = []  # token ids whose keys/values are in the cache, in order
        # the generation that owns the cache right now (weak: a dropped stream releases the model)
        self._active: weakref.ref | None = None
        self.draft: Model | str | None = None  # speculative decoding: a draft Model or "prompt-lookup"
        if draft is not None:
            self.set_draft(draft)
        self.load_s = time.perf_counter() - t0

    def __repr__(self) -> str:
        return (f"Model({str(self.path)!r}, precision={self.manifest.get('precision')!r}, "
                f"providers={self.providers}, max_length={self.max_length})")

    # -- prompts ---------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None,
                      tools: list[dict] | None = None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidArgumentError("pass exactly one of prompt=, messages= or tokens=")
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if tools:
            raise InvalidArgumentError("tools= needs messages= (they go through the chat template)")
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be a string, not {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            raise InvalidArgumentError("the prompt is empty; pass some text")
        return ids

    # -- generation ------------------------------------------------------------------------
    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               tokens: Sequence[int] | None = None, tools: list[dict] | None = None,
               reuse_cache: bool = False, **settings: Any) -> "_Stream":
        """Yield text chunks as they are generated; see ``generate`` for the settings.

        ``tokens=`` takes an already encoded prompt (token ids). The stream's ``result`` holds
        the GenerationResult once it is exhausted or closed. One stream at a time per Model:
        starting another while one is unfinished raises ModelBusyError (use ``fork()`` for
        concurrent conversations over the same weights).
        """
        if self._active is not None and self._active() is not None:
            raise ModelBusyError(
                f"{self.path.name} is already generating: exhaust or close() the other stream first, "
                "or fork() the model for concurrent generations")
        stream = _Stream(self, self._start(prompt, messages, reuse_cache, settings, tokens, tools))
        self._active = weakref.ref(stream)
        return stream

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, stop: Sequence[str] | str = (), seed: int | None = None,
                 reuse_cache: bool = False, num_draft_tokens: int | None = None,
                 response_format: Any = None, logits_processors: Sequence[Any] = (),
                 tokens: Sequence[int] | None = None, tools: list[dict] | None = None) -> GenerationResult:
        """Generate a completion of ``prompt`` (or of ``messages`` through the chat template).

        Greedy by default (temperature=0). ``reuse_cache=True`` keeps the cached prefix that the
        new prompt shares with the previous call (multi-turn chat prefills only the new turn).
        With a draft (``load(..., draft=...)``), ``num_draft_tokens`` fixes how many tokens are
        proposed per target call (default None: adaptive; 0: plain decoding).

        ``response_format`` constrains the output (llguidance, ``pip install edgesdk[serve]``):
        ``{"type": "json_schema", "json_schema": {"schema": {...}}}`` (or a bare JSON schema dict),
        ``{"type": "json_object"}``, ``{"type": "regex", "regex": "..."}`` or
        ``{"type": "grammar", "grammar": "<lark>"}``. ``logits_processors`` are callables
        ``(logits, context_ids) -> logits`` applied before sampling. ``tools`` go to the chat template.
        """
        stream = self.stream(prompt, messages=messages, tokens=tokens, tools=tools, reuse_cache=reuse_cache,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                             num_draft_tokens=num_draft_tokens, response_format=response_format,
                             logits_processors=logits_processors)
        with stream:
            for _ in stream:
                pass
        return stream.result

    def check_full_vocabulary(self) -> None:
        if self.lm_head_tokens is not None:
            raise InvalidArgumentError(
                f"{self.path} keeps only {len(self.lm_head_tokens)} of the vocabulary's tokens in its lm_head "
                "(exported with --draft-vocab): it can only serve as a draft; load it with draft= of another model")

    def _start(self, prompt, messages, reuse_cache, settings, tokens=None, tools=None) -> Driver:
        started = time.perf_counter()
        self.check_full_vocabulary()
        cfg = GenerationConfig(**settings)
        cfg.validate()
        if tokens is not None:
            if prompt is not None or messages is not None or tools:
                raise InvalidArgumentError("pass exactly one of prompt=, messages= or tokens=")
            ids = [int(t) for t in tokens]
            if not ids:
                raise InvalidArgumentError("tokens= is empty; pass at least one token id")
        else:
            ids = self.encode_prompt(prompt, messages, tools)
        if cfg.response_format is not None:
            from .constraints import constraint

            mask = constraint(self.tokenizer, cfg.response_format, self.eos_token_ids)
            if mask is not None:
                cfg.logits_processors = [*cfg.logits_processors, mask]
        if len(ids) > self.max_length:
            raise ContextOverflowError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_length}; shorten it")
        keep = self._keep_prefix(ids, reuse_cache)
        driver = Driver(self.tokenizer, cfg, self.eos_token_ids, prompt_tokens=len(ids),
                        room=self.max_length - len(ids) + 1, prefilled=len(ids) - keep, started=started)
        if self.draft is None or cfg.num_draft_tokens == 0:
            driver.source = plain_tokens(self.decoder, ids, ids[keep:], cfg.sampler())
        else:
            driver.source = self._speculative_source(driver, cfg, ids, keep, reuse_cache)
        driver.prompt_ids = ids
        return driver

    def _keep_prefix(self, ids: list[int], reuse_cache: bool) -> int:
        """Rewind the cache to the longest prefix it shares with ``ids`` (0 unless reuse_cache),
        always leaving the last prompt token to recompute; return that prefix's length."""
        keep = 0
        if reuse_cache:
            limit = min(len(self._cached), len(ids) - 1)
            while keep < limit and self._cached[keep] == ids[keep]:
                keep += 1
        self.decoder.rewind(keep)
        self._cached = list(ids[:keep])
        return keep

    def _finish(self, driver: Driver) -> None:
        """Record what the cache holds once a stream ends (exhausted, closed early or failed)."""
        self._active = None
        every = driver.prompt_ids + driver.tokens
        for m in (self, self.draft if isinstance(self.draft, Model) else None):
            if m is not None:
                if m.decoder.length > len(every):  # a speculative step the driver cut short
                    m.decoder.rewind(len(every))
                m._cached = every[: m.decoder.length]

    # -- speculative decoding ----------------------------------------------------------------
    def set_draft(self, draft: "Model | str | os.PathLike | None") -> None:
        """Speculate with ``draft``: a loaded Model or artifact path with the same tokenizer,
        "prompt-lookup" (no draft model), or None (plain decoding)."""
        from .speculative import check_tokenizers

        if isinstance(draft, (str, os.PathLike)) and str(draft) != "prompt-lookup":
            draft = load(draft, max_length=self.max_length, threads=self.session.get_session_options()
                         .intra_op_num_threads or None, draft=False, _spinning=False)
        if draft is self:
            raise InvalidArgumentError("a model cannot be its own draft object; load the artifact a second time")
        if isinstance(draft, Model):
            check_tokenizers(self.tokenizer, draft.tokenizer, str(self.path), str(draft.path))
        elif draft not in (None, "prompt-lookup"):
            raise InvalidArgumentError(f"draft={draft!r} is invalid: pass an artifact path, a loaded Model, "
                                       "or \"prompt-lookup\"")
        self.check_full_vocabulary()
        self.draft = draft

    def _speculative_source(self, driver: Driver, cfg: GenerationConfig, ids: list[int], keep: int,
                            reuse_cache: bool):
        from .speculative import DraftModel, PromptLookup, new_stats, speculative_tokens

        if isinstance(self.draft, Model):
            self.draft._keep_prefix(ids, reuse_cache)
            proposer = DraftModel(self.draft.decoder, self.draft.lm_head_tokens,
                                  self.manifest["model"]["vocab_size"])
        else:
            proposer = PromptLookup()
        driver.stats = new_stats(proposer.method, cfg.num_draft_tokens)
        return speculative_tokens(self.decoder, proposer, ids, ids[keep:], cfg, self.eos_token_ids,
                                  driver.budget, driver.stats, cfg.num_draft_tokens)

    def reset(self) -> None:
        """Forget the cached conversation."""
        if self._active is not None and self._active() is not None:
            raise ModelBusyError(f"{self.path.name} is generating: close() the stream before reset()")
        self.decoder.rewind(0)
        self._cached = []

    def fork(self) -> "Model":
        """Another Model over the same session and weights with its own KV cache (and a fork of
        its draft model): one per concurrent conversation, e.g. a server's slots. Forks share
        the onnxruntime session, so run them from one thread at a time."""
        import copy

        if not isinstance(self.decoder, Decoder):
            raise InvalidArgumentError(f"{self.path.name} is a static (fixed-shape) artifact: fork() supports "
                                       "builder artifacts only; run one conversation at a time (serve --parallel 1)")
        twin = copy.copy(self)
        twin.decoder = Decoder(self.session, self.artifact.genai_config, self.max_length,
                               device=self._device, logits_to_keep=self.decoder.keep_name)
        twin._cached, twin._active = [], None
        if isinstance(self.draft, Model):
            twin.draft = self.draft.fork()
        return twin

    def chat(self, system: str | None = None) -> "Chat":
        return Chat(self, system)


class _Stream:
    """The iterator ``Model.stream`` returns. Exhausting it, ``close()`` (also on ``break`` out of a
    ``with`` block or when it is garbage-collected) or an error all release the model and
    leave its cache consistent; ``result`` then holds what was generated."""

    def __init__(self, model: Model, driver: Driver):
        self._model = model
        self._driver = driver
        self._it = driver.run(driver.source)
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> GenerationChunk:
        if self.result is not None:
            raise StopIteration
        try:
            return next(self._it)
        except BaseException:  # StopIteration, or an error in the middle of a step
            self._end()
            raise

    def close(self) -> None:
        """Stop generating; the tokens produced so far stay in the result (finish_reason "cancelled")."""
        if self.result is None:
            self._it.close()
            if self._driver.finish_reason is None:
                self._driver.finish_reason = "cancelled"
            self._end()

    def _end(self) -> None:
        if self.result is None:
            if not hasattr(self._driver, "ended"):  # closed before its first step
                self._driver.ended = time.perf_counter()
            self._model._finish(self._driver)
            self.result = self._driver.result()

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Chat:
    """A multi-turn conversation that keeps the KV cache between turns.

    A reply cut short (``break`` out of ``send``, or ``close()`` on it) is kept as the assistant's
    turn as far as it got, so the history never holds a user turn without a reply."""

    def __init__(self, model: Model, system: str | None = None):
        if system is not None and not isinstance(system, str):
            raise InvalidArgumentError(f"system must be a string or None, not {type(system).__name__}")
        self.model = model
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def send(self, text: str, **settings: Any) -> Iterator[GenerationChunk]:
        if not isinstance(text, str) or not text:
            raise InvalidArgumentError(f"send() takes the user's message as a non-empty string, not {text!r}")
        stream = self.model.stream(messages=[*self.messages, {"role": "user", "content": text}],
                                   reuse_cache=True, **settings)
        self.messages.append({"role": "user", "content": text})
        reply = []
        try:
            for chunk in stream:
                reply.append(chunk.text)
                yield chunk
        finally:
            stream.close()
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            self.last = stream.result


def load(path: str | os.PathLike, target: str = "auto", *, max_length: int | None = None,
         threads: int | None = None, verify: bool | str = True, strict: bool = False,
         prefer: str | None = None, draft: "Model | str | os.PathLike | bool | None" = None,
         draft_target: str = "auto", public_key: str | os.PathLike | None = None,
         _spinning: bool = True) -> Model:
    """Load an artifact folder made by ``edgesdk export``.

    target: "auto" picks the best provider the artifact was built for that this machine has;
    a target name (e.g. "cpu") forces that profile's providers. max_length caps the KV cache
    (default: the model's context). verify: True checks every file against the manifest's
    sha256, rehashing only files changed since they were last verified (a record in the user's
    cache keyed by each file's inode, size, mtime and ctime); "full" rehashes every file; False
    checks sizes only.

    draft: speculative decoding. An artifact path or a loaded Model with the same tokenizer,
    or "prompt-lookup" (propose from the prompt, no draft model). None uses the draft bundled by
    ``edgesdk export --draft`` if the artifact has one; False turns that off. draft_target
    resolves the draft's providers on its own (it may run on another execution provider).

    public_key: an EC public key (PEM path); refuse the artifact unless its model.sig (from
    ``edgesdk sign``) verifies with it over every current file. Needs ``edgesdk[sign]``.
    """
    from ..targets import plan, report  # local: keeps `import edgesdk` light

    _check_load_args(target, max_length, threads, draft_target, prefer)
    if isinstance(path, (str, os.PathLike)) and str(path):
        from ..distribute import package as _package

        if _package.is_package(path):  # an ONNX Runtime model package: this machine's variant
            path = _package.select(path, target)
    art = _artifact.read(path, verify=verify)
    if public_key is not None:  # local: model_signing is imported only when a key is given
        from ..distribute.sign import check_signature
        check_signature(art.path, public_key)
    chosen = plan(art.manifest, target, strict=strict, prefer=prefer)
    providers, notes, threads = chosen.providers, chosen.notes, threads or chosen.threads
    if draft is None and art.manifest.get("draft"):
        draft = art.path / art.manifest["draft"]["path"]
    draft = draft or None
    two_sessions = draft is not None and str(draft) != "prompt-lookup"
    # Two sessions taking turns must not spin their worker threads (they would fight for cores).
    model = Model(art, providers, notes, max_length=max_length, threads=threads,
                  spinning=_spinning and not two_sessions, strict=strict)
    report(log, art.path, model.providers, model.provider_notes)
    if isinstance(draft, (str, os.PathLike)) and str(draft) != "prompt-lookup":
        draft = load(draft, draft_target, max_length=model.max_length, threads=threads, verify=verify,
                     strict=strict, draft=False, _spinning=False)
    if draft is not None:
        model.set_draft(draft)
    return model


def _check_load_args(target, max_length, threads, draft_target, prefer) -> None:
    """load()'s arguments, checked before any work, each with a one-line InvalidArgumentError."""
    for name, value in (("target", target), ("draft_target", draft_target)):
        if not isinstance(value, str) or not value:
            raise InvalidArgumentError(f"{name}={value!r} is invalid: pass a target name such as \"auto\" or \"cpu\"")
    if prefer is not None and (not isinstance(prefer, str) or not prefer):
        raise InvalidArgumentError(f"prefer={prefer!r} is invalid: pass npu, gpu, cpu or a provider name")
    for name, value, low in (("max_length", max_length, 2), ("threads", threads, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise InvalidArgumentError(f"{name}={value!r} is invalid: it must be an integer of at least {low}")
