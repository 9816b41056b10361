"""Model: an artifact loaded for inference. ``edgesdk.load`` returns one."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from .. import artifact as _artifact
from ..errors import ContextOverflowError, InvalidArgumentError
from .decoder import Decoder
from .generate import Driver, GenerationChunk, GenerationConfig, GenerationResult, plain_tokens
from .session import create_session
from .tokenizer import Tokenizer

log = logging.getLogger("edgesdk")


class Model:
    def __init__(self, art: _artifact.Artifact, providers: list[tuple[str, dict[str, Any]]],
                 notes: list[str] | None = None, max_length: int | None = None,
                 threads: int | None = None, spinning: bool = True, draft: "Model | str | None" = None):
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
        self.session = create_session(art.model_path, providers, threads, spinning, notes=self.provider_notes)
        self.providers = self.session.get_providers()
        device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.decoder = Decoder(self.session, genai, self.max_length, device=device)
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
        self.draft: Model | str | None = None  # speculative decoding: a draft Model or "prompt-lookup"
        if draft is not None:
            self.set_draft(draft)
        self.load_s = time.perf_counter() - t0

    def __repr__(self) -> str:
        return (f"Model({str(self.path)!r}, precision={self.manifest.get('precision')!r}, "
                f"providers={self.providers}, max_length={self.max_length})")

    # -- prompts ---------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidArgumentError("pass exactly one of prompt= or messages=")
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be a string, not {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            raise InvalidArgumentError("the prompt is empty; pass some text")
        return ids

    # -- generation ------------------------------------------------------------------------
    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               reuse_cache: bool = False, **settings: Any) -> Iterator[GenerationChunk]:
        """Yield text chunks as they are generated; see ``generate`` for the settings.

        The generator's ``result`` attribute holds the GenerationResult once it is exhausted.
        """
        return _Stream(self, self._start(prompt, messages, reuse_cache, settings))

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, stop: Sequence[str] | str = (), seed: int | None = None,
                 reuse_cache: bool = False, num_draft_tokens: int | None = None) -> GenerationResult:
        """Generate a completion of ``prompt`` (or of ``messages`` through the chat template).

        Greedy by default (temperature=0). ``reuse_cache=True`` keeps the cached prefix that the
        new prompt shares with the previous call (multi-turn chat prefills only the new turn).
        With a draft (``load(..., draft=...)``), ``num_draft_tokens`` fixes how many tokens are
        proposed per target call (default None: adaptive; 0: plain decoding).
        """
        stream = self.stream(prompt, messages=messages, reuse_cache=reuse_cache,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                             num_draft_tokens=num_draft_tokens)
        for _ in stream:
            pass
        return stream.result

    def check_full_vocabulary(self) -> None:
        if self.lm_head_tokens is not None:
            raise InvalidArgumentError(
                f"{self.path} keeps only {len(self.lm_head_tokens)} of the vocabulary's tokens in its lm_head "
                "(exported with --draft-vocab): it can only serve as a draft; load it with draft= of another model")

    def _start(self, prompt, messages, reuse_cache, settings) -> Driver:
        started = time.perf_counter()
        self.check_full_vocabulary()
        cfg = GenerationConfig(**settings)
        cfg.validate()
        ids = self.encode_prompt(prompt, messages)
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
        self.decoder.rewind(0)
        self._cached = []

    def chat(self, system: str | None = None) -> "Chat":
        return Chat(self, system)


class _Stream:
    def __init__(self, model: Model, driver: Driver):
        self._model = model
        self._driver = driver
        self._it = driver.run(driver.source)
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> GenerationChunk:
        try:
            return next(self._it)
        except StopIteration:
            self._model._finish(self._driver)
            self.result = self._driver.result()
            raise


class Chat:
    """A multi-turn conversation that keeps the KV cache between turns."""

    def __init__(self, model: Model, system: str | None = None):
        self.model = model
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def send(self, text: str, **settings: Any) -> Iterator[GenerationChunk]:
        self.messages.append({"role": "user", "content": text})
        stream = self.model.stream(messages=self.messages, reuse_cache=True, **settings)
        reply = []
        for chunk in stream:
            reply.append(chunk.text)
            yield chunk
        self.messages.append({"role": "assistant", "content": "".join(reply)})
        self.last = stream.result


def load(path: str | os.PathLike, target: str = "auto", *, max_length: int | None = None,
         threads: int | None = None, verify: bool = True, strict: bool = False,
         prefer: str | None = None, draft: "Model | str | os.PathLike | bool | None" = None,
         draft_target: str = "auto", _spinning: bool = True) -> Model:
    """Load an artifact folder made by ``edgesdk export``.

    target: "auto" picks the best provider the artifact was built for that this machine has;
    a target name (e.g. "cpu") forces that profile's providers. max_length caps the KV cache
    (default: the model's context). verify=False skips the sha256 check of the files.

    draft: speculative decoding. An artifact path or a loaded Model with the same tokenizer,
    or "prompt-lookup" (propose from the prompt, no draft model). None uses the draft bundled by
    ``edgesdk export --draft`` if the artifact has one; False turns that off. draft_target
    resolves the draft's providers on its own (it may run on another execution provider).
    """
    from ..targets import plan, report  # local: keeps `import edgesdk` light

    art = _artifact.read(path, verify=verify)
    chosen = plan(art.manifest, target, strict=strict, prefer=prefer)
    providers, notes, threads = chosen.providers, chosen.notes, threads or chosen.threads
    if draft is None and art.manifest.get("draft"):
        draft = art.path / art.manifest["draft"]["path"]
    draft = draft or None
    two_sessions = draft is not None and str(draft) != "prompt-lookup"
    # Two sessions taking turns must not spin their worker threads (they would fight for cores).
    model = Model(art, providers, notes, max_length=max_length, threads=threads,
                  spinning=_spinning and not two_sessions)
    report(log, art.path, model.providers, model.provider_notes)
    if isinstance(draft, (str, os.PathLike)) and str(draft) != "prompt-lookup":
        draft = load(draft, draft_target, max_length=model.max_length, threads=threads, verify=verify,
                     strict=strict, draft=False, _spinning=False)
    if draft is not None:
        model.set_draft(draft)
    return model
