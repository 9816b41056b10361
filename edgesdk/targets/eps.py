"""Execution providers (EPs): what each is, where it comes from, and whether this machine has it.

Three ways an EP reaches onnxruntime:
- built in (CPU; CoreML on macOS builds),
- a replacement wheel (onnxruntime-gpu, onnxruntime-directml, onnxruntime-openvino): the EP
  appears in ``onnxruntime.get_available_providers()``,
- a plugin package (onnxruntime-qnn >= 2, onnxruntime-ep-openvino): a shared library that we
  register with ``onnxruntime.register_execution_provider_library``; its EP then shows up in
  ``onnxruntime.get_ep_devices()`` once per device it found, and sessions take it through
  ``SessionOptions.add_provider_for_devices``.

Listed or registered is not the same as working: a QNN backend that cannot load, or an
OpenVINO device_type this machine lacks, still creates a session, with every node silently on
the CPU. ``probe`` runs a one-node graph with CPU fallback disabled to tell the difference.
"""
from __future__ import annotations

import base64
import contextlib
import importlib
import importlib.metadata as md
import os
import sys
from dataclasses import dataclass
from typing import Any

CPU = "CPUExecutionProvider"
DEVICE_ORDER = {"npu": 0, "gpu": 1, "cpu": 2}  # target="auto": NPU, then GPU, then CPU


@dataclass(frozen=True)
class EPInfo:
    device: str  # cpu | gpu | npu (the default; an entry's options or `device:` can say otherwise)
    short: str  # the name onnxruntime-genai's genai_config.json uses ("" if genai has none)
    install: str  # how a user gets it


KNOWN: dict[str, EPInfo] = {
    CPU: EPInfo("cpu", "cpu", "built into every onnxruntime package"),
    "CUDAExecutionProvider": EPInfo("gpu", "cuda", "pip install onnxruntime-gpu on a machine with an NVIDIA driver and CUDA 12"),
    "TensorrtExecutionProvider": EPInfo("gpu", "", "pip install onnxruntime-gpu and TensorRT"),
    "NvTensorRTRTXExecutionProvider": EPInfo("gpu", "NvTensorRtRtx", "an onnxruntime build with TensorRT-RTX"),
    "DmlExecutionProvider": EPInfo("gpu", "dml", "pip install onnxruntime-directml on Windows"),
    "WebGpuExecutionProvider": EPInfo("gpu", "webgpu", "a build of onnxruntime with WebGPU, or onnxruntime-web in a browser"),
    "ROCMExecutionProvider": EPInfo("gpu", "", "an onnxruntime build with ROCm"),
    "MIGraphXExecutionProvider": EPInfo("gpu", "", "pip install onnxruntime-migraphx"),
    "QNNExecutionProvider": EPInfo("npu", "qnn", "pip install onnxruntime-qnn"),
    "OpenVINOExecutionProvider": EPInfo("cpu", "OpenVINO", "pip install onnxruntime-ep-openvino or onnxruntime-openvino"),
    "CoreMLExecutionProvider": EPInfo("npu", "", "the onnxruntime package on macOS"),
    "VitisAIExecutionProvider": EPInfo("npu", "VitisAI", "AMD Ryzen AI software"),
    "NnapiExecutionProvider": EPInfo("npu", "", "onnxruntime-android"),
    "XnnpackExecutionProvider": EPInfo("cpu", "", "an onnxruntime build with XNNPACK"),
    "AzureExecutionProvider": EPInfo("cpu", "", "built into onnxruntime"),
}

# EP name -> (python module, pip name) of the plugin packages we know how to register.
PLUGINS: dict[str, tuple[str, str]] = {
    "QNNExecutionProvider": ("onnxruntime_qnn", "onnxruntime-qnn"),
    "OpenVINOExecutionProvider": ("onnxruntime_ep_openvino", "onnxruntime-ep-openvino"),
}

# Wheels that each install the `onnxruntime` Python package itself: two of them side by side
# overwrite each other's files and whichever was installed last silently wins.
CORE_WHEELS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
               "onnxruntime-training", "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-silicon",
               "onnxruntime-cann", "onnxruntime-vitisai", "onnxruntime-qnn")  # onnxruntime-qnn < 2 only

# A one-node graph (Add of two float[1,4]), serialised ONNX, so the runtime needs no `onnx`.
_PROBE = base64.b64decode(
    "CAgSB2VkZ2VzZGs6VgoOCgF4CgF5EgF6IgNBZGQSBXByb2JlWhMKAXgSDgoMCAESCAoCCAEKAggEWhMKAXkSDgoMCAESCAoCCAEKAggE"
    "YhMKAXoSDgoMCAESCAoCCAEKAggEQgQKABAN")

_registered: dict[str, str | None] = {}  # EP name -> None (registered) or why not
_probed: dict[tuple, str | None] = {}


def device_of(entry: dict[str, Any]) -> str:
    """cpu | gpu | npu for a profile's provider entry."""
    if entry.get("device"):
        return entry["device"]
    if entry["name"] == "OpenVINOExecutionProvider":
        dt = str((entry.get("options") or {}).get("device_type", "CPU")).upper()
        return "npu" if dt.startswith("NPU") else "gpu" if dt.startswith("GPU") else "cpu"
    return KNOWN[entry["name"]].device if entry["name"] in KNOWN else "cpu"


def option_strings(options: dict[str, Any] | None) -> dict[str, str]:
    """onnxruntime wants provider options as strings; YAML gives ints and booleans too."""
    return {k: ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in (options or {}).items()}


def dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def core_wheels() -> dict[str, str]:
    """The installed wheels that provide the `onnxruntime` package, by name -> version."""
    found = {}
    for name in CORE_WHEELS:
        v = dist_version(name)
        if v is None:
            continue
        if name == "onnxruntime-qnn" and int(v.split(".")[0]) >= 2:
            continue  # 2.x is a plugin package, not a replacement wheel
        found[name] = v
    return found


def register_plugin(name: str) -> str | None:
    """Register the plugin package for EP ``name`` once per process. None when registered, else why not."""
    if name in _registered:
        return _registered[name]
    import onnxruntime as ort

    module, pip_name = PLUGINS[name]
    why: str | None = None
    if not hasattr(ort, "register_execution_provider_library"):
        why = f"onnxruntime {ort.__version__} cannot load plugin EPs (needs 1.22 or newer)"
    else:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            why = f"not installed; to get it: {KNOWN[name].install}"
        else:
            try:
                ort.register_execution_provider_library(mod.get_ep_name(), mod.get_library_path())
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
                if "already registered" not in str(e):
                    why = f"{pip_name} is installed but its library did not register: {first_line(e)}"
    _registered[name] = why
    return why


def is_plugin(name: str) -> bool:
    """Registered through its plugin package in this process (not a classic EP)."""
    return name in _registered and _registered[name] is None


def plugin_devices(name: str, options: dict[str, Any] | None = None) -> list:
    """The OrtEpDevices a registered plugin EP found (for OpenVINO: of the asked device_type)."""
    import onnxruntime as ort

    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    want = str((options or {}).get("device_type", "")).upper()
    if name == "OpenVINOExecutionProvider" and want:
        devices = [d for d in devices if want.startswith(d.device.type.name)]
    return devices


def availability(entry: dict[str, Any]) -> tuple[str | None, str | None]:
    """(how, why_not) for a provider entry: how is "builtin" or "plugin" when usable, else why_not says why."""
    import onnxruntime as ort

    name, options = entry["name"], entry.get("options") or {}
    plugin_why = register_plugin(name) if name in PLUGINS else "not a plugin"
    if plugin_why is None:  # a registered plugin also shows in get_available_providers(): check it first
        if not plugin_devices(name, options):
            what = f"{options['device_type']} " if name == "OpenVINOExecutionProvider" and options.get("device_type") else ""
            return None, f"{PLUGINS[name][1]} is installed but found no {what}device on this machine"
        return "plugin", None
    if name in ort.get_available_providers():
        if name == "OpenVINOExecutionProvider" and options.get("device_type"):
            ids = _openvino_device_ids()
            want = str(options["device_type"]).upper()
            if ids is not None and not any(want.startswith(i.split(".")[0]) for i in ids):
                return None, f"OpenVINO found no {want} device (it has: {', '.join(ids) or 'none'})"
        return "builtin", None
    if name in PLUGINS and not plugin_why.startswith("not installed"):
        return None, plugin_why
    hint = KNOWN[name].install if name in KNOWN else "an onnxruntime build that has it"
    return None, f"not in this onnxruntime build; to get it: {hint}"


def _openvino_device_ids() -> list[str] | None:
    try:
        from onnxruntime.capi import _pybind_state as C

        return list(C.get_available_openvino_device_ids())
    except Exception:  # noqa: BLE001 - absent outside the onnxruntime-openvino wheel
        return None


def add_to_session_options(so, name: str, options: dict[str, Any]) -> None:
    """Append a plugin EP to ``so`` (classic EPs go in InferenceSession's providers= instead)."""
    so.add_provider_for_devices(plugin_devices(name, options), option_strings(options))


def probe(name: str, options: dict[str, Any] | None, how: str) -> str | None:
    """Run a one-node graph on EP ``name`` alone. None if it ran there, else why not."""
    key = (name, tuple(sorted(option_strings(options).items())), how)
    if key in _probed:
        return _probed[key]
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    why = None
    try:
        if how == "plugin":
            add_to_session_options(so, name, options or {})
            with native_stdout_to_stderr():
                sess = ort.InferenceSession(_PROBE, sess_options=so)
        else:
            sess = ort.InferenceSession(_PROBE, sess_options=so, providers=[name],
                                        provider_options=[option_strings(options)])
        if name not in sess.get_providers():
            why = "onnxruntime dropped it when creating a session"
        else:
            x = np.ones((1, 4), np.float32)
            sess.run(None, {"x": x, "y": x})
    except Exception as e:  # noqa: BLE001
        msg = first_line(e)
        if "assigned to the default CPU EP" in msg:
            msg = "it took no node of a one-node probe graph (see onnxruntime's log for the cause)"
        why = f"failed to initialise: {msg}"
    _probed[key] = why
    return why


@contextlib.contextmanager
def native_stdout_to_stderr():
    """Native EP libraries (QNN's) print banners on fd 1; keep them off our stdout (JSON, text)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real fd 1 (embedded interpreters)
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        _flush_c_stdio()  # what the library buffered must go out while fd 1 is still stderr
        os.dup2(saved, 1)
        os.close(saved)


def _flush_c_stdio() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except Exception:  # noqa: BLE001 - Windows has no CDLL(None); nothing buffered to lose there
        pass


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    for prefix in ("[ONNXRuntimeError] : ",):
        if prefix in text:
            text = text.split(" : ", 3)[-1]
    return text[:240]
