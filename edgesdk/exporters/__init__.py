"""Build an artifact: source -> HF folder -> target recipe -> quantized graph -> checked folder."""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .. import artifact, targets
from ..provenance import package_versions
from ..errors import InvalidArgumentError, OutputExistsError, TargetError
from . import builder, sources
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
           draft_vocab: int | None = None, vocab_texts: Sequence[str | os.PathLike] = ()) -> Path:
    """Export ``source`` (HF folder, hub id, .gguf or pkg:DIST) for ``target`` into the folder ``out``.

    ``draft``: a second source (same tokenizer) exported for the same target into ``out/draft``
    and recorded in the manifest; ``edgesdk.load(out)`` then decodes speculatively with it.

    INT4 from a GGUF on a profile with ``gguf_blocks: true`` keeps the GGUF's own 4-bit blocks
    (and its 8-bit-or-less embeddings/lm_head) exactly instead of quantizing the dequantized
    weights again; ``requantize_gguf=True`` quantizes them again with the profile's algorithm.

    ``draft_vocab=N`` keeps only the N most frequent tokens (counted in ``vocab_texts``) in the
    lm_head of the draft (with ``draft``) or of this export, which can then only serve as a draft.
    """
    set_quiet(quiet)
    profile = targets.load(target)
    recipe = profile.export.get("recipe", "builder")
    if recipe != "builder":
        raise TargetError(f"cannot export for {profile.name} yet: it needs the {recipe}-shape recipe, which edgesdk "
                          f"does not have yet; `--target {profile.name}` at load time runs artifacts built elsewhere")
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
    for t in vocab_texts:
        if not Path(t).is_file():
            raise InvalidArgumentError(f"vocabulary text {t} does not exist")
    out = Path(out or f"build/{Path(str(source)).stem.replace(':', '-')}-{profile.name}-{precision}").absolute()
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; choose another -o or pass --force to replace it")

    with stage(f"Reading {source}"):
        src = sources.resolve(source)
    say(f"    {src.architecture} ({src.kind}{', ' + src.gguf_type if src.gguf_type else ''})")
    with artifact.staging(out, force=force) as tmp:
        work = Path(tempfile.mkdtemp(prefix=".edgesdk-work-", dir=out.parent))
        try:
            hf_dir = sources.prepare(src, work)
            ep = profile.export.get("execution_provider", "cpu")
            builder.build(hf_dir, tmp, work / "cache", precision, ep, builder.builder_options(precision, profile.export))
            quant = dict(profile.export.get(precision) or {}) if precision in ("int4", "int8") else None
            if quant is not None and quant.pop("gguf_blocks", False):
                if src.kind == "gguf" and precision == "int4" and not requantize_gguf:
                    quant["gguf_blocks"] = _carry_gguf_blocks(src, hf_dir, tmp)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        restricted = None
        if draft_vocab and draft is None:
            from . import draft_vocab as dv

            with stage(f"Restricting the lm_head to the {draft_vocab} most frequent tokens"):
                dv.restrict(tmp, dv.rank(tmp, draft_vocab, vocab_texts))
            restricted = {"file": dv.TOKENS_FILE, "count": int(draft_vocab),
                          "ranked_by": [Path(t).name for t in vocab_texts] or "token id"}
        if draft is not None:
            draft_entry = _bundle_draft(draft, profile.name, tmp, draft_precision or precision, context_length, quiet,
                                        requantize_gguf, draft_vocab, vocab_texts)
            set_quiet(quiet)
        with stage("Writing the manifest"):
            builder.cap_context(tmp, context_length)
            genai = builder.write_runtime_options(tmp, profile.providers, profile.runtime.get("threads"))
            inputs, outputs, ops = builder.graph_io(tmp / genai["model"]["decoder"]["filename"])
            manifest = {
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
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
            artifact.write_manifest(tmp, manifest)
        if profile.device == "cpu":
            with stage("Checking the artifact loads and runs"):
                _smoke_test(tmp)
    say(f"==> Wrote {out}")
    return out


def _carry_gguf_blocks(src: sources.Source, hf_dir: Path, folder: Path) -> dict[str, Any]:
    from . import gguf_repack

    with stage(f"Carrying {src.path.name}'s own quantized blocks into the graph"):
        config = json.loads((hf_dir / "config.json").read_text())
        return gguf_repack.repack(folder, src.path, hf_dir, config, max_bits=4, lm_head_bits=8).manifest()


def _bundle_draft(draft, target: str, folder: Path, precision: str, context_length: int | None,
                  quiet: bool, requantize_gguf: bool, draft_vocab: int | None,
                  vocab_texts: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Export the draft into folder/draft and check that it shares the target's tokenizer."""
    from ..runtime.speculative import check_tokenizers
    from ..runtime.tokenizer import Tokenizer

    say(f"==> Exporting the draft model {draft}")
    sub = export(draft, target, folder / "draft", precision=precision, context_length=context_length, quiet=quiet,
                 requantize_gguf=requantize_gguf, draft_vocab=draft_vocab, vocab_texts=vocab_texts)
    check_tokenizers(Tokenizer(folder), Tokenizer(sub), "the target", str(draft))
    made = artifact.read(sub, verify=False).manifest
    return {"path": "draft", "source": made["source"], "precision": precision}


def _smoke_test(folder: Path) -> None:
    from ..runtime.model import Model

    model = Model(artifact.read(folder), [("CPUExecutionProvider", {})], max_length=8)
    model.decoder.forward([model.manifest["generation"].get("bos_token_id") or 0])
