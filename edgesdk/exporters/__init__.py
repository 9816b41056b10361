"""Build an artifact: source -> HF folder -> target recipe -> quantized graph -> checked folder."""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

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
           draft_precision: str | None = None) -> Path:
    """Export ``source`` (HF folder, hub id, .gguf or pkg:DIST) for ``target`` into the folder ``out``.

    ``draft``: a second source (same tokenizer) exported for the same target into ``out/draft``
    and recorded in the manifest; ``edgesdk.load(out)`` then decodes speculatively with it.
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
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if draft is not None:
            draft_entry = _bundle_draft(draft, profile.name, tmp, draft_precision or precision, context_length, quiet)
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
                "quantization": dict(profile.export.get(precision) or {}) if precision in ("int4", "int8") else None,
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


def _bundle_draft(draft, target: str, folder: Path, precision: str, context_length: int | None,
                  quiet: bool) -> dict[str, Any]:
    """Export the draft into folder/draft and check that it shares the target's tokenizer."""
    from ..runtime.speculative import check_tokenizers
    from ..runtime.tokenizer import Tokenizer

    say(f"==> Exporting the draft model {draft}")
    sub = export(draft, target, folder / "draft", precision=precision, context_length=context_length, quiet=quiet)
    check_tokenizers(Tokenizer(folder), Tokenizer(sub), "the target", str(draft))
    made = artifact.read(sub, verify=False).manifest
    return {"path": "draft", "source": made["source"], "precision": precision}


def _smoke_test(folder: Path) -> None:
    from ..runtime.model import Model

    model = Model(artifact.read(folder), [("CPUExecutionProvider", {})], max_length=8)
    model.decoder.forward([model.manifest["generation"].get("bos_token_id") or 0])
