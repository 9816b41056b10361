"""onnxruntime.InferenceSession with options that suit on-device decoding."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ..errors import ArtifactError, EnvironmentMismatchError, EdgeSDKError, TargetError


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
                if name != eps.CPU and _FALLBACK_DISABLED in msg:
                    msg = refused_nodes(model_path, remaining, how, threads, extra) or msg
                if name == eps.CPU or last:
                    if name != eps.CPU:
                        raise TargetError(f"{name} cannot run {model_path.name} here: {msg}") from None
                    raise session_error(model_path, e) from None
                why = f"failed to create the session: {msg}"
            else:
                if name == eps.CPU or name in sess.get_providers():
                    return sess
                why = "onnxruntime dropped it when creating the session"
        if last:
            raise TargetError(f"{name} cannot run here: {why}")
        notes.append(f"skipped {name}: {why}")
        remaining = remaining[1:]


_FALLBACK_DISABLED = "fallback to CPU EP has been explicitly disabled"


def refused_nodes(model_path: Path, providers: list[tuple[str, dict[str, Any]]], how: str | None,
                  threads: int | None, extra: dict[str, str] | None) -> str | None:
    """Which nodes ``providers[0]`` leaves to the CPU EP, named with their operators, from
    onnxruntime's record of its graph assignment (a second session with CPU fallback allowed).
    None when that cannot be found out."""
    name = providers[0][0]
    allowed = {k: v for k, v in (extra or {}).items() if k != "session.disable_cpu_ep_fallback"}
    allowed["session.record_ep_graph_assignment_info"] = "1"
    try:
        sess = _open(model_path, providers[:1], how, threads, False, allowed)
        on_cpu = [(n.name, n.op_type) for sg in sess.get_provider_graph_assignment_info()
                  if sg.ep_name != name for n in sg.get_nodes()]
    except Exception:  # the diagnosis is a courtesy: keep onnxruntime's own message
        return None
    if not on_cpu:
        return None
    first = f"node {on_cpu[0][0] or '(unnamed)'} ({on_cpu[0][1]})"
    ops = sorted({op for _, op in on_cpu[1:]})
    more = f" and {len(on_cpu) - 1} more ({', '.join(ops)})" if len(on_cpu) > 1 else ""
    return (f"it does not support {first}{more}, and CPU fallback is disabled; re-export the artifact for "
            f"this target with this edgesdk, or allow CPU fallback")


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


_TOO_OLD = ("is not a registered function/op", "Unsupported model IR version", "is under development",
            "Could not find an implementation for")
_NO_MEMORY = ("bad_alloc", "Failed to allocate", "out of memory", "Cannot allocate memory", "MemoryError")
_CORRUPT = ("protobuf parsing failed", "INVALID_PROTOBUF", "external data", "tensor_proto", "TensorProto",
            "NO_SUCHFILE", "No such file", "unexpected end", "corrupt", "size mismatch", "INVALID_GRAPH")


def session_error(model_path: Path, exc: BaseException) -> EdgeSDKError:
    """Name why onnxruntime could not create a CPU session: an onnxruntime too old for the graph,
    too little memory, a corrupt file, or (anything else) what onnxruntime said."""
    text = f"{type(exc).__name__}: {exc}"
    gist = _gist(str(exc) or type(exc).__name__)
    if isinstance(exc, MemoryError) or any(k in text for k in _NO_MEMORY):
        size = sum(f.stat().st_size for f in model_path.parent.glob(model_path.name + "*") if f.is_file())
        return EnvironmentMismatchError(
            f"not enough memory to load {model_path.name} ({size / 1e9:.2f} GB of graph and weights): close other "
            "programs, lower max_length, or export a smaller precision such as int4")
    if any(k in text for k in _TOO_OLD):
        return EnvironmentMismatchError(
            f"onnxruntime {ort.__version__} is too old for {model_path.name} ({gist}); upgrade it "
            "(pip install -U onnxruntime) or re-export the artifact with this machine's versions")
    if any(k in text for k in _CORRUPT):
        return ArtifactError(f"cannot load {model_path}: {gist}; the file is corrupt or incomplete, re-export it")
    return ArtifactError(f"onnxruntime {ort.__version__} cannot create a session for {model_path}: {gist}")


def _gist(msg: str) -> str:
    """onnxruntime's message without its status prefix and C++ source location, on one line."""
    import re

    msg = " ".join(msg.split())
    msg = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", msg)
    opset = re.search(r"Opset (\d+) is under development.*?support for domain (\S+) is till opset (\d+)", msg)
    if opset:
        return f"the graph uses opset {opset[1]} of {opset[2]}, this onnxruntime supports up to {opset[3]}"
    for key in ("Unsupported model IR version", "Fatal error: ", "Could not find an implementation"):
        if key in msg:
            return msg[msg.index(key):].removeprefix("Fatal error: ")[:300]
    if msg.startswith("/") and ") " in msg:  # "/path/file.cc:123 signature(...) what happened"
        msg = msg.rsplit(") ", 1)[-1]
    return msg[:300]
