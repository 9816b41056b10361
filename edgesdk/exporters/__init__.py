"""Build an artifact: source -> HF folder -> target recipe -> quantized graph -> checked folder."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .. import artifact, targets
from ..provenance import package_versions
from ..errors import ArtifactError, InvalidArgumentError
from . import builder, export_cache, logits, sources
from .progress import say, set_quiet, stage

PRECISIONS = ("int4", "int8", "fp16", "fp32")
TOOLS = ("edgesdk", "onnxruntime", "onnxruntime-genai", "onnx", "onnx-ir", "transformers", "torch", "gguf",
         "tokenizers")


def tool_versions() -> dict[str, str]:
    return package_versions(TOOLS)


def _eos_ids(hf_dir: Path, genai: dict) -> list[int]:
    ids: list[int] = []
    gen_path = hf_dir / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    eos = genai["model"].get("eos_token_id")
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return sorted({int(i) for i in ids})


def export(source: str | os.PathLike, target: str = "cpu", out: str | os.PathLike | None = None, *,
           precision: str | None = None, force: bool = False, context_length: int | None = None,
           quiet: bool = False, draft: str | os.PathLike | None = None,
           draft_precision: str | None = None, requantize_gguf: bool = False,
           draft_vocab: int | None = None, vocab_texts: Sequence[str | os.PathLike] = (),
           draft_keep_precision: bool = False, _draft: bool = False, _record: bool = True,
           chunk: int | None = None, calibration: str | os.PathLike | None = None,
           ep_context: bool | None = None) -> Path:
    """Export ``source`` (HF folder, hub id, .gguf or pkg:DIST) for ``target`` into the folder ``out``.

    ``draft``: a second source (same tokenizer) exported for the same target into ``out/draft``
    and recorded in the manifest; ``edgesdk.load(out)`` then decodes speculatively with it.

    INT4 from a GGUF on a profile with ``gguf_blocks: true`` keeps the GGUF's own 4-bit blocks
    (and its 8-bit-or-less embeddings/lm_head) exactly instead of quantizing the dequantized
    weights again; ``requantize_gguf=True`` quantizes them again with the profile's algorithm.

    ``draft_vocab=N`` keeps only the N most frequent tokens (counted in ``vocab_texts``) in the
    lm_head of the draft (with ``draft``) or of this export, which can then only serve as a draft.

    A draft from a GGUF (``draft``, or this export with ``draft_vocab``) is made for speed: its
    5-8-bit tensors are quantized again to the profile's 4-bit blocks (its 4-bit ones are kept),
    so a draft step reads fewer bytes; the target checks every token, so the output does not
    change. ``draft_keep_precision=True`` keeps them at 8 bits, as a plain export would.

    Targets whose profile says ``recipe: static`` (qnn, openvino, coreml) get a fixed-shape
    prefill/decode pair (exporters/static.py): ``context_length`` is its context C, ``chunk`` its
    prefill chunk S, ``calibration`` the text its int8/int4 (QDQ) graphs are calibrated on.
    ``ep_context`` (default: the profile's ``export.ep_context``) also compiles them into QNN
    context binaries (EPContext graphs) that load in milliseconds on the device.
    """
    set_quiet(quiet)
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise InvalidArgumentError(f"source must be a model folder, hub id, .gguf path or pkg:DIST, not {source!r}")
    if not isinstance(target, (str, os.PathLike)) or not str(target):
        raise InvalidArgumentError(f"target must be a target name or a profile .yaml path, not {target!r}")
    profile = targets.load(target)
    recipe = profile.export.get("recipe", "builder")
    if recipe == "static":
        from . import static

        asked_context = context_length  # the profile's default is capped at the model's context, this is not
        static.check_options(context_length or profile.export.get("context_length"),
                             chunk or profile.export.get("chunk"), calibration)
        if draft is not None or draft_vocab:
            raise InvalidArgumentError(f"--draft and --draft-vocab are not available for {profile.name} (static "
                                       "graphs); load a CPU draft at run time instead: load(..., draft=PATH)")
        ep_context = profile.export.get("ep_context", False) if ep_context is None else ep_context
        if ep_context:
            static.check_ep_context(profile)
    elif chunk is not None or calibration is not None or ep_context:
        raise InvalidArgumentError(f"--chunk, --calibration and --ep-context apply to static targets (qnn, openvino, "
                                   f"coreml), not to {profile.name}")
    precision = precision or profile.export["precision"]
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    if precision not in profile.precisions:
        raise InvalidArgumentError(f"target {profile.name} does not support {precision}; "
                                   f"it supports {', '.join(profile.precisions)}")
    context_length = context_length or profile.export.get("context_length")
    if context_length is not None and context_length < 2:
        raise InvalidArgumentError(f"context_length={context_length} is invalid: it must be at least 2")
    if draft_vocab is not None and draft_vocab < 1:
        raise InvalidArgumentError(f"--draft-vocab {draft_vocab} is invalid: it must be a positive token count")
    if draft_keep_precision and not (draft is not None or draft_vocab or _draft):
        raise InvalidArgumentError("--draft-keep-precision applies to a draft: use it with --draft or --draft-vocab")
    draft_bits = _draft_bits(draft_vocab, draft, draft_keep_precision, _draft)
    for t in vocab_texts:
        if not Path(t).is_file():
            raise InvalidArgumentError(f"vocabulary text {t} does not exist")
    out = artifact.check_destination(
        out or f"build/{Path(str(source)).stem.replace(':', '-')}-{profile.name}-{precision}", force)

    with stage(f"Reading {source}"):
        src = sources.resolve(source)
    say(f"    {src.architecture} ({src.kind}{', ' + src.gguf_type if src.gguf_type else ''})")
    cache_key = None
    if export_cache.root() is not None:
        cache_key = export_cache.key(
            src.manifest(), profile.as_dict(),
            {"precision": precision, "context_length": context_length, "requantize_gguf": requantize_gguf,
             "draft_bits": draft_bits,
             "draft": sources.resolve(draft).manifest() if draft is not None else None,
             "draft_precision": draft_precision, "draft_vocab": draft_vocab, "chunk": chunk,
             **({"ep_context": True} if ep_context else {})},
            {"vocab_texts": list(vocab_texts), "calibration": calibration}, tool_versions())
        hit = export_cache.lookup(cache_key)
        if hit is not None:
            with stage(f"Copying the identical export cached in {hit}"):
                with artifact.staging(out, force=force) as tmp:
                    export_cache.copy_into(hit, tmp)
                    manifest = artifact.read(tmp, verify=False).manifest  # lookup() hashed the entry
            if _record:
                artifact.remember_verified(out, manifest)
            say(f"==> Wrote {out}")
            return out
    with artifact.staging(out, force=force) as tmp:
        work = Path(tempfile.mkdtemp(prefix=".edgesdk-work-", dir=out.parent))
        try:
            ep = profile.export.get("execution_provider", "cpu")
            streamed = _stream_gguf(src, recipe, precision, requantize_gguf, profile, tmp, work, ep, draft_bits)
            hf_streamed = None if streamed else _stream_hf(src, recipe, precision, profile, tmp, work, ep)
            float_graph = _stream_float(src, recipe, work) if not streamed else None
            hf_dir = streamed[0] if streamed else float_graph or sources.prepare(src, work)
            static_info = None
            if recipe == "static":
                static_info = static.export(hf_dir, tmp, work, profile, precision, asked_context, chunk, calibration,
                                            built=float_graph is not None)
                if ep_context:
                    static_info["ep_context"] = static.compile_ep_context(tmp, static_info, profile)
            elif not streamed and not hf_streamed:
                builder.build(hf_dir, tmp, work / "cache", precision, ep,
                              builder.builder_options(precision, profile.export))
            quant = dict(profile.export.get(precision) or {}) if precision in ("int4", "int8") else None
            if static_info is not None:
                quant = static_info.pop("quantization", None)
            if quant is not None and quant.pop("gguf_blocks", False):
                if src.kind == "gguf" and precision == "int4" and not requantize_gguf:
                    quant["gguf_blocks"] = streamed[1] if streamed else _carry_gguf_blocks(src, hf_dir, tmp)
            if quant is not None and hf_streamed:
                quant["streamed"] = hf_streamed
        finally:
            shutil.rmtree(work, ignore_errors=True)
        restricted = None
        if draft_vocab and draft is None:
            from . import draft_vocab as dv

            with stage(f"Restricting the lm_head to the {draft_vocab} most frequent tokens"):
                dv.restrict(tmp, dv.rank(tmp, draft_vocab, vocab_texts))
            restricted = {"file": dv.TOKENS_FILE, "count": int(draft_vocab),
                          "ranked_by": [Path(t).name for t in vocab_texts] or "token id"}
        # prefill/verify compute only the logits they read (a num_logits_to_keep input); the graph is final here
        keep_logits = {} if recipe == "static" else logits.add_keep_input(tmp)
        if draft is not None:
            draft_entry = _bundle_draft(draft, profile.name, tmp, draft_precision or precision, context_length, quiet,
                                        requantize_gguf, draft_vocab, vocab_texts, draft_keep_precision)
            set_quiet(quiet)
        with stage("Writing the manifest"):
            builder.cap_context(tmp, context_length)
            genai = builder.write_runtime_options(tmp, profile.providers, profile.runtime.get("threads"))
            inputs, outputs, ops = builder.graph_io(tmp / genai["model"]["decoder"]["filename"])
            manifest = {
                "created": artifact.build_time(),
                "source": src.manifest(),
                "target": profile.name,
                "precision": precision,
                "quantization": quant,
                "tools": tool_versions(),
                "model": {
                    "filename": genai["model"]["decoder"]["filename"],
                    "type": genai["model"]["type"],
                    "io_dtype": next(i["dtype"] for i in inputs if i["name"].startswith("past_key_values")),
                    "context_length": genai["model"]["context_length"],
                    "vocab_size": genai["model"]["vocab_size"],
                    "hidden_size": genai["model"]["decoder"]["hidden_size"],
                    "num_layers": genai["model"]["decoder"]["num_hidden_layers"],
                    "num_kv_heads": genai["model"]["decoder"]["num_key_value_heads"],
                    "head_size": genai["model"]["decoder"]["head_size"],
                    "inputs": inputs,
                    "outputs": outputs,
                    "op_types": ops,
                    **({"lm_head_tokens": restricted} if restricted else {}),
                    **keep_logits,
                    **({"recipe": "static", "static": static_info} if static_info else {}),
                },
                "runtime": {"providers": profile.providers, "kv_cache": profile.runtime.get("kv_cache", "shared-buffer"),
                            **({"threads": profile.runtime["threads"]} if profile.runtime.get("threads") else {})},
                "generation": {
                    "eos_token_ids": _eos_ids(hf_dir, genai),
                    "bos_token_id": genai["model"].get("bos_token_id"),
                    "chat_template": (tmp / "chat_template.jinja").is_file()
                                     or "chat_template" in json.loads((tmp / "tokenizer_config.json").read_text()
                                                                      if (tmp / "tokenizer_config.json").is_file() else "{}"),
                    "max_new_tokens": 256,
                    "temperature": 0.0,
                },
            }
            if draft is not None:
                manifest["draft"] = draft_entry
            manifest = artifact.write_manifest(tmp, manifest)
        if profile.device == "cpu":
            with stage("Checking the artifact loads and runs"):
                _smoke_test(tmp)
    if _record:  # a bundled draft is recorded with its target, at the final path
        artifact.remember_verified(out, manifest)
    if cache_key is not None:
        export_cache.store(cache_key, out)
    say(f"==> Wrote {out}")
    return out


def _draft_bits(draft_vocab: int | None, draft, keep_precision: bool, is_draft: bool) -> int:
    """The widest weights of this export: 4 for a speculative draft (a bundled one, or one whose
    lm_head is restricted) unless asked to keep its precision, else 8."""
    return 4 if (is_draft or (draft_vocab and draft is None)) and not keep_precision else 8


def _stream_gguf(src: sources.Source, recipe: str, precision: str, requantize_gguf: bool, profile, folder: Path,
                 work: Path, ep: str, max_bits: int = 8) -> tuple[Path, dict[str, Any]] | None:
    """INT4 from a GGUF on a gguf_blocks profile: written tensor by tensor from the GGUF
    (exporters/gguf_stream.py), with no float copy of the model. None where that does not apply
    or cannot be done (said in one line): the caller dequantizes through transformers."""
    if not (src.kind == "gguf" and recipe == "builder" and precision == "int4" and not requantize_gguf
            and (profile.export.get("int4") or {}).get("gguf_blocks")):
        return None
    from . import gguf_stream

    try:
        return gguf_stream.export(src, folder, work, ep, builder.builder_options(precision, profile.export), max_bits)
    except gguf_stream.Unsupported as e:
        _discard_stream(src, e, "dequantizing it through transformers instead", folder, work / "hf")
        return None


def _stream_float(src: sources.Source, recipe: str, work: Path) -> Path | None:
    """The static recipe's float source graph, written weight by weight into ``work/builder`` from
    a GGUF's blocks (exporters/gguf_stream.py) or an HF folder's safetensors (hf_stream.py) instead
    of through transformers' float copy of the model. The HF folder (config, tokenizer), or None
    where that does not apply or cannot be done (said in one line)."""
    if recipe != "static" or (src.kind != "gguf" and (src.kind not in ("hf-folder", "hub") or src.hf_dir is None)):
        return None
    from . import gguf_stream, hf_stream

    base = work / "builder"
    base.mkdir(parents=True, exist_ok=True)
    try:
        if src.kind == "gguf":
            return gguf_stream.export_float(src, base, work)
        return hf_stream.export_float(src, base, work)
    except gguf_stream.Unsupported as e:
        how = "dequantizing it through transformers" if src.kind == "gguf" else "loading it through transformers"
        _discard_stream(src, e, how + " instead", base, work / "hf")
        return None


def _stream_hf(src: sources.Source, recipe: str, precision: str, profile, folder: Path, work: Path,
               ep: str) -> dict[str, Any] | None:
    """INT4 from an HF folder's safetensors: written weight by weight (exporters/hf_stream.py)
    instead of through a float32 copy of the whole model. The report, or None where that does not
    apply or cannot be done (said in one line): the caller runs the builder on the folder."""
    if not (src.kind in ("hf-folder", "hub") and recipe == "builder" and precision == "int4"
            and profile.export.get("io_dtype", "float32") == "float32"):  # fp16 graphs: the builder's own pass
        return None
    from . import hf_stream

    try:
        return hf_stream.export(src, folder, work, ep, builder.builder_options(precision, profile.export))[1]
    except hf_stream.Unsupported as e:
        _discard_stream(src, e, "loading it through transformers instead", folder, work / "cache")
        return None


def _discard_stream(src: sources.Source, why: Exception, instead: str, folder: Path, scratch: Path) -> None:
    """A streaming attempt that cannot be done: say so in one line and remove what it wrote (in
    edgesdk's own temporary folders), so the builder's path starts from nothing."""
    say(f"    cannot stream {src.path.name} ({why}); {instead}")
    for f in folder.iterdir():
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    shutil.rmtree(scratch, ignore_errors=True)


def _carry_gguf_blocks(src: sources.Source, hf_dir: Path, folder: Path) -> dict[str, Any]:
    from . import gguf_repack

    with stage(f"Carrying {src.path.name}'s own quantized blocks into the graph"):
        config = json.loads((hf_dir / "config.json").read_text())
        return gguf_repack.repack(folder, src.path, hf_dir, config, max_bits=4, lm_head_bits=8).manifest()


def _bundle_draft(draft, target: str, folder: Path, precision: str, context_length: int | None,
                  quiet: bool, requantize_gguf: bool, draft_vocab: int | None,
                  vocab_texts: Sequence[str | os.PathLike], keep_precision: bool = False) -> dict[str, Any]:
    """Export the draft into folder/draft and check that it shares the target's tokenizer."""
    from ..runtime.speculative import check_tokenizers
    from ..runtime.tokenizer import Tokenizer

    say(f"==> Exporting the draft model {draft}")
    sub = export(draft, target, folder / "draft", precision=precision, context_length=context_length, quiet=quiet,
                 requantize_gguf=requantize_gguf, draft_vocab=draft_vocab, vocab_texts=vocab_texts,
                 draft_keep_precision=keep_precision, _draft=True, _record=False)
    check_tokenizers(Tokenizer(folder), Tokenizer(sub), "the target", str(draft))
    made = artifact.read(sub, verify=False).manifest
    return {"path": "draft", "source": made["source"], "precision": precision}


_SMOKE = """
import sys
from pathlib import Path
try:
    from edgesdk import artifact
    from edgesdk.runtime.model import Model
    # every file was hashed a moment ago by write_manifest: check only that they are all there
    model = Model(artifact.read(Path(sys.argv[1]), verify=False), [("CPUExecutionProvider", {})], max_length=8)
    model.decoder.forward([model.manifest["generation"].get("bos_token_id") or 0])
except Exception as e:
    print((str(e).strip() or type(e).__name__).splitlines()[0], file=sys.stderr)
    sys.exit(1)
"""


def _smoke_test(folder: Path) -> None:
    """Load the artifact and run one token on the CPU, in a child process: onnxruntime holds the
    weights and their prepacked copy (about twice the artifact), and the export's own peak
    memory then does not carry that on top of what exporting took."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _SMOKE, str(folder)], capture_output=True, text=True)
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise ArtifactError(f"the exported artifact does not load and run on the CPU: {why}")
