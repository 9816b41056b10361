"""onnxruntime.InferenceSession with options that suit on-device decoding."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ..errors import ArtifactError, TargetError


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
    # The builder's graph is already fused; the remaining passes are cheap at load time.
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
                   extra: dict[str, str] | None = None, notes: list[str] | None = None) -> ort.InferenceSession:
    """A session on the first of ``providers`` that works here, falling back along the list.

    A provider that fails to initialise (its probe or the session itself fails, or onnxruntime
    drops it) is skipped with a line appended to ``notes``; the last one left must work. A
    single-entry list (what strict=True resolves to) therefore never falls back.
    """
    from ..targets import eps

    remaining = list(providers or [(eps.CPU, {})])
    notes = notes if notes is not None else []
    while True:
        name, options = remaining[0]
        last = len(remaining) == 1
        how, why = "builtin", None
        if name != eps.CPU:
            how, why = eps.availability({"name": name, "options": options})
            if how is not None:
                why = eps.probe(name, options, how)
        if why is None:
            try:
                sess = _open(model_path, remaining, how, threads, spinning, extra)
            except Exception as e:  # onnxruntime raises its own exception types
                msg = eps.first_line(e)
                if name == eps.CPU or last:
                    if name != eps.CPU:
                        raise TargetError(f"{name} cannot run {model_path.name} here: {msg}") from None
                    raise ArtifactError(f"cannot load {model_path}: {msg[:300]}; the file is corrupt or "
                                        "incomplete, re-export it") from None
                why = f"failed to create the session: {msg}"
            else:
                if name == eps.CPU or name in sess.get_providers():
                    return sess
                why = "onnxruntime dropped it when creating the session"
        if last:
            raise TargetError(f"{name} cannot run here: {why}")
        notes.append(f"skipped {name}: {why}")
        remaining = remaining[1:]


def _open(model_path: Path, providers: list[tuple[str, dict[str, Any]]], how: str | None,
          threads: int | None, spinning: bool, extra: dict[str, str] | None) -> ort.InferenceSession:
    from ..targets import eps

    so = session_options(threads, spinning, extra)
    name, options = providers[0]
    if how == "plugin":  # plugin EPs come through the session options; nodes it lacks run on the CPU
        eps.add_to_session_options(so, name, options)
        with eps.native_stdout_to_stderr():
            return ort.InferenceSession(str(model_path), sess_options=so)
    # Classic EPs: this one and the classic ones after it (onnxruntime assigns nodes in this order).
    classic = [(n, o) for i, (n, o) in enumerate(providers)
               if i == 0 or (n in ort.get_available_providers() and not eps.is_plugin(n))]
    return ort.InferenceSession(str(model_path), sess_options=so, providers=[n for n, _ in classic],
                                provider_options=[eps.option_strings(o) for _, o in classic])
