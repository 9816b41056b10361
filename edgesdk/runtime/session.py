"""onnxruntime.InferenceSession with options that suit on-device decoding."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ..errors import ArtifactError


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads do not help matmul-bound decoding)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        usable = os.cpu_count() or 1
    try:
        cores = set()
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
        if cores:
            return max(1, min(usable, len(cores)))
    except OSError:
        pass
    return max(1, usable)


def session_options(threads: int | None = None, spinning: bool = True,
                    extra: dict[str, str] | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # The builder's graph is already fused; basic optimizations only keep loading fast.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Spinning worker threads make each decode step faster but burn a core while waiting;
    # ORT parks them after a short spin, so an idle app does not keep the CPU busy.
    # Two sessions taking turns (speculative decoding) must turn it off or they fight.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    for k, v in (extra or {}).items():
        so.add_session_config_entry(k, str(v))
    return so


def create_session(model_path: Path, providers: list[tuple[str, dict[str, Any]]] | None = None,
                   threads: int | None = None, spinning: bool = True,
                   extra: dict[str, str] | None = None) -> ort.InferenceSession:
    providers = providers or [("CPUExecutionProvider", {})]
    try:
        return ort.InferenceSession(str(model_path), sess_options=session_options(threads, spinning, extra),
                                    providers=[p for p, _ in providers],
                                    provider_options=[o for _, o in providers])
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"cannot load {model_path}: {msg[:300]}; the file is corrupt or incomplete, re-export it") from None
