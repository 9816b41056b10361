"""Quantization quality of an artifact: perplexity over a text, and against a baseline artifact
(usually the FP32 export) the relative perplexity increase, greedy top-1 agreement and the mean
KL divergence of the next-token distributions.

Everything runs through the runtime's own sessions (``edgesdk.load``): each window of the text
is one ``decoder.forward`` on an empty KV cache, which returns the logits of every position.

Windows slide like Hugging Face's perplexity guide, but every token is scored exactly once: the
first window scores its tokens 1..W-1, each later window (starting ``stride`` < W tokens
further) scores only the tokens past the previous window's end, so each scored token has at
least ``W - stride`` tokens of context.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ArtifactError, InvalidArgumentError

DEFAULT_WINDOW = 1024
_ROWS = 128  # positions per chunk of float64 log-softmax (bounds memory at ~50 MB per model)


@dataclass
class EvalResult:
    artifact: str
    precision: str | None
    text: str
    text_tokens: int  # tokens of the text that were evaluated
    scored_tokens: int  # tokens that were predicted (all but the first)
    window: int
    stride: int
    perplexity: float
    mean_nll: float  # nats per token
    seconds: float
    providers: list[str]
    baseline: dict[str, Any] | None = field(default=None)
    # with a baseline: {"artifact", "precision", "perplexity", "mean_nll", "relative_increase",
    #                   "kl_mean", "kl_max", "top1_agreement"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.artifact} ({self.precision}): perplexity {self.perplexity:.4f} over {self.scored_tokens} "
                 f"tokens (window {self.window}, stride {self.stride}; {self.seconds:.1f} s)"]
        b = self.baseline
        if b:
            lines += [
                f"{b['artifact']} ({b['precision']}, baseline): perplexity {b['perplexity']:.4f}",
                f"perplexity increase  {b['relative_increase'] * 100:+.2f}%",
                f"top-1 agreement      {b['top1_agreement'] * 100:.2f}%",
                f"mean KL divergence   {b['kl_mean']:.5f} nats (baseline || artifact; max {b['kl_max']:.3f})",
            ]
        return "\n".join(lines)


def read_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"the text file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"the text file {p} is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise InvalidArgumentError(f"the text file {p} is empty; evaluation needs real text")
    return text


def spans(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window over ``n`` tokens; tokens [first_scored, end) are scored."""
    out = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def check_window(n_tokens: int, window: int | None, stride: int | None, context: int) -> tuple[int, int]:
    """Validate (and default) the window and stride for a text of ``n_tokens`` and a model context."""
    if window is None:
        window = min(DEFAULT_WINDOW, context)
    if window < 2:
        raise InvalidArgumentError(f"--window {window} is too small; it must be at least 2 tokens")
    if window > context:
        raise InvalidArgumentError(f"--window {window} is larger than the model's context of {context} tokens")
    stride = window // 2 if stride is None else stride
    if not 1 <= stride < window:
        # consecutive windows must overlap by a token: a window's first token has no context in it
        raise InvalidArgumentError(f"--stride {stride} is invalid: it must be between 1 and the window minus one "
                                   f"({window - 1}), so that consecutive windows overlap and every token is scored")
    if n_tokens < window:
        raise InvalidArgumentError(
            f"the text has {n_tokens} tokens, fewer than the window of {window}; use a longer text or a smaller --window")
    return window, stride


def _open(path: str | os.PathLike, role: str):
    """(manifest, tokenizer) of an artifact, without building its session."""
    from . import artifact
    from .runtime.tokenizer import Tokenizer

    if not Path(path).exists():
        if role == "baseline":
            raise ArtifactError(f"the baseline artifact {path} does not exist; export one first "
                                f"(e.g. `edgesdk export SOURCE --precision fp32 -o {path}`)")
        raise ArtifactError(f"no artifact at {path}: export one with `edgesdk export SOURCE -o {path}`")
    art = artifact.read(path, verify=False)  # load() verifies the checksums
    return art.manifest, Tokenizer(art.path)


def _same_tokenizer(a, b, a_name: str, b_name: str) -> None:
    fa, fb = a.fingerprint(), b.fingerprint()
    if fa != fb:
        diff = len(set(fa["vocab"].items()) ^ set(fb["vocab"].items()))
        what = f"{diff} vocabulary entries differ" if diff else "their special tokens differ"
        raise InvalidArgumentError(f"{a_name} and the baseline {b_name} use different tokenizers ({what}); "
                                   "they cannot be compared token by token")


@dataclass
class _Plan:
    ids: list[int]
    window: int
    stride: int


def plan(artifact: str | os.PathLike, text_file: str | os.PathLike, *, baseline: str | os.PathLike | None = None,
         window: int | None = None, stride: int | None = None, max_tokens: int | None = None,
         fit_window: bool = False) -> _Plan:
    """Check the inputs (text, artifacts, tokenizers, window) without building any session.

    fit_window: shrink the default window to a text shorter than it instead of refusing it.
    """
    text = read_text(text_file)
    if max_tokens is not None and max_tokens < 2:
        raise InvalidArgumentError(f"--max-tokens {max_tokens} is invalid: it must be at least 2")
    manifest, tok = _open(artifact, "artifact")
    context = int(manifest["model"]["context_length"])
    if baseline is not None:
        base_manifest, base_tok = _open(baseline, "baseline")
        _same_tokenizer(tok, base_tok, str(artifact), str(baseline))
        if base_manifest["model"]["vocab_size"] != manifest["model"]["vocab_size"]:
            raise InvalidArgumentError(
                f"{artifact} has {manifest['model']['vocab_size']} logits per token and the baseline {baseline} "
                f"{base_manifest['model']['vocab_size']}; they cannot be compared")
        context = min(context, int(base_manifest["model"]["context_length"]))
    ids = tok.encode(text, add_special_tokens=True)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if fit_window and window is None:
        window = max(2, min(DEFAULT_WINDOW, context, len(ids)))
    window, stride = check_window(len(ids), window, stride, context)
    return _Plan(ids, window, stride)


def evaluate(artifact: str | os.PathLike, text_file: str | os.PathLike, *, baseline: str | os.PathLike | None = None,
             window: int | None = None, stride: int | None = None, max_tokens: int | None = None,
             target: str = "auto", threads: int | None = None, fit_window: bool = False,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Perplexity of ``artifact`` on the text in ``text_file`` (and its quality against ``baseline``).

    window: tokens per forward pass (default: min(1024, context)); stride: how far each window
    moves (default: window // 2); max_tokens: evaluate only the first max_tokens tokens.
    """
    from .runtime.model import load

    p = plan(artifact, text_file, baseline=baseline, window=window, stride=stride, max_tokens=max_tokens,
             fit_window=fit_window)
    ids, window, stride = p.ids, p.window, p.stride
    # Only a window's worth of KV cache is needed.
    model = load(artifact, target=target, max_length=window, threads=threads)
    base = load(baseline, target=target, max_length=window, threads=threads) if baseline is not None else None
    for m in (model, base):
        if m is not None:
            m.check_full_vocabulary()  # a perplexity needs every token's probability

    t0 = time.perf_counter()
    nll = base_nll = kl_sum = 0.0
    kl_max = 0.0
    agree = scored = 0
    todo = spans(len(ids), window, stride)
    for i, (begin, end, first) in enumerate(todo):
        chunk = ids[begin:end]
        model.decoder.rewind(0)
        logits = model.decoder.forward(chunk)
        if base is not None:
            base.decoder.rewind(0)
            base_logits = base.decoder.forward(chunk)
        # the logits at position t predict token t + 1
        for r0 in range(first - 1 - begin, end - 1 - begin, _ROWS):
            r1 = min(r0 + _ROWS, end - 1 - begin)
            target_ids = np.asarray(chunk[r0 + 1:r1 + 1])
            rows = np.arange(r1 - r0)
            lp = _log_softmax(logits[r0:r1])
            nll -= lp[rows, target_ids].sum()
            scored += r1 - r0
            if base is not None:
                blp = _log_softmax(base_logits[r0:r1])
                base_nll -= blp[rows, target_ids].sum()
                kl = (np.exp(blp) * (blp - lp)).sum(axis=-1)
                kl_sum += kl.sum()
                kl_max = max(kl_max, float(kl.max()))
                agree += int((lp.argmax(-1) == blp.argmax(-1)).sum())
        if progress:
            progress(i + 1, len(todo))
    seconds = time.perf_counter() - t0

    result = EvalResult(
        artifact=str(artifact), precision=model.manifest.get("precision"), text=str(text_file),
        text_tokens=len(ids), scored_tokens=scored, window=window, stride=stride,
        perplexity=math.exp(nll / scored), mean_nll=nll / scored, seconds=seconds, providers=list(model.providers))
    if base is not None:
        bppl = math.exp(base_nll / scored)
        result.baseline = {
            "artifact": str(baseline), "precision": base.manifest.get("precision"),
            "perplexity": bppl, "mean_nll": base_nll / scored,
            "relative_increase": result.perplexity / bppl - 1.0,
            "kl_mean": kl_sum / scored, "kl_max": kl_max, "top1_agreement": agree / scored,
        }
    return result


def export_quality(source: str | os.PathLike, artifact: str | os.PathLike, text_file: str | os.PathLike, *,
                   context_length: int | None = None, progress: Callable[[int, int], None] | None = None) -> str:
    """What ``edgesdk export ... --eval-text FILE`` prints: the new artifact's perplexity and, unless it
    is FP32 itself, its quality against an FP32 reference exported (for the CPU) to a temporary folder."""
    import shutil
    import tempfile

    from . import artifact as _artifact
    from .exporters import export

    precision = _artifact.read(artifact, verify=False).manifest.get("precision")
    plan(artifact, text_file, fit_window=True)  # refuse a bad text before the reference export
    if precision == "fp32":
        r = evaluate(artifact, text_file, fit_window=True, progress=progress)
        return "quality: " + r.summary() + "\n(this artifact is the FP32 reference; no delta to report)"
    tmp = Path(tempfile.mkdtemp(prefix=".edgesdk-fp32-ref-", dir=Path(artifact).absolute().parent))
    try:
        ref = export(source, "cpu", tmp / "fp32", precision="fp32", context_length=context_length, quiet=True)
        r = evaluate(artifact, text_file, baseline=ref, fit_window=True, progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    b = r.baseline
    return (f"quality on {r.text} ({r.scored_tokens} tokens, window {r.window}, stride {r.stride}):\n"
            f"  {precision} perplexity {r.perplexity:.4f} vs FP32 {b['perplexity']:.4f}: "
            f"{b['relative_increase'] * 100:+.2f}%\n"
            f"  top-1 agreement {b['top1_agreement'] * 100:.2f}%, mean KL divergence {b['kl_mean']:.5f} nats")
