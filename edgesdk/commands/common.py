"""Arguments shared by the verbs that load and run an artifact."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="auto", help="runtime target (default: auto)")
    p.add_argument("--prefer", default=None, help="device kind (npu, gpu, cpu) or provider to try first")
    p.add_argument("--strict", action="store_true", help="fail instead of falling back to another provider")
    p.add_argument("--max-length", type=int, default=None, help="cap the KV cache (default: model context)")
    p.add_argument("--threads", type=int, default=None)
    add_verify_arg(p)


def add_verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full-verify", action="store_true",
                   help="rehash every file (default: only files changed since they were last verified)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def settings(a: argparse.Namespace) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed)


def load_model(a: argparse.Namespace, **extra):
    from ..runtime.model import load

    return load(a.artifact, target=a.target, max_length=a.max_length, threads=a.threads,
                prefer=getattr(a, "prefer", None), strict=getattr(a, "strict", False),
                verify="full" if a.full_verify else True, **extra)


def check_json_file(path: str | None) -> None:
    """Refuse a --json FILE that cannot be written, before the work that fills it."""
    from ..errors import InvalidArgumentError

    if not path or path == "-":
        return
    p = Path(path).absolute()
    if p.is_dir():
        raise InvalidArgumentError(f"cannot write {path}: it is a folder; pass a file name")
    if not p.parent.is_dir():
        raise InvalidArgumentError(f"cannot write {path}: its folder does not exist")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InvalidArgumentError(f"cannot write {path}: permission denied; choose another file")


def write_json_file(path: str, data: dict) -> None:
    """Write the report atomically: a failure leaves no half-written file."""
    import json
    import tempfile

    from ..errors import EdgeSDKError

    p = Path(path).absolute()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, p)
    except OSError as e:
        raise EdgeSDKError(f"cannot write {path} ({e.strerror or e}); the report was printed above") from None
