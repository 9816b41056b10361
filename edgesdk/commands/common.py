"""Arguments shared by the verbs that load and run an artifact."""
from __future__ import annotations

import argparse


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="auto", help="runtime target (default: auto)")
    p.add_argument("--prefer", default=None, help="device kind (npu, gpu, cpu) or provider to try first")
    p.add_argument("--strict", action="store_true", help="fail instead of falling back to another provider")
    p.add_argument("--max-length", type=int, default=None, help="cap the KV cache (default: model context)")
    p.add_argument("--threads", type=int, default=None)


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
                prefer=getattr(a, "prefer", None), strict=getattr(a, "strict", False), **extra)
