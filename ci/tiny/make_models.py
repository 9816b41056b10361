"""Write the tiny random models ci/tiny/build.yaml builds (the test suite's own tiny models,
tests/conftest.py: real architectures, a fixed seed, SmolLM2's real tokenizer) into DIR/models."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Tiny, smollm2_gguf  # noqa: E402


def main(folder: Path) -> None:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = folder / "tokenizer"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tokenizer)
    tiny = Tiny(folder, tokenizer)
    for arch in ("llama", "qwen2"):
        made = tiny.model(arch)
        target = folder / "models" / arch
        target.parent.mkdir(parents=True, exist_ok=True)
        made.rename(target)
        print(f"tiny {arch} model: {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
