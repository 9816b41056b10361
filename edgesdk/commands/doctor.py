"""edgesdk doctor [--json]: what this machine's ONNX Runtime can do, and what is wrong with it."""
from __future__ import annotations

import argparse
import json
import platform
import sys


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check ONNX Runtime, execution providers and devices on this machine")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=run)


def collect() -> dict:
    import onnxruntime as ort

    from .. import __version__, targets
    from ..targets import eps

    report: dict = {
        "edgesdk": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system().lower()}-{platform.machine().lower()}",
        "onnxruntime": {"version": ort.__version__, "device": ort.get_device(),
                        "build": _build_info(ort), "path": ort.__file__.rsplit("/", 1)[0]},
    }
    wheels = eps.core_wheels()
    plugins = {pip: v for pip in (p for _, p in eps.PLUGINS.values()) if (v := eps.dist_version(pip))}
    genai = {n: v for n in ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml")
             if (v := eps.dist_version(n))}
    report["packages"] = {**wheels, **plugins, **genai}
    problems = []
    if len(wheels) > 1:
        problems.append(f"conflicting onnxruntime wheels installed side by side: {', '.join(sorted(wheels))}; "
                        f"they overwrite each other's files. Keep one: pip uninstall {' '.join(sorted(wheels))} "
                        f"&& pip install <the one you need>")
    if not wheels:
        problems.append("no onnxruntime wheel is installed (pip install onnxruntime)")
    report["providers"] = list(ort.get_available_providers())
    registered = {}
    for name, (_, pip) in eps.PLUGINS.items():
        why = eps.register_plugin(name)
        if why is None or not why.startswith("not installed"):
            registered[name] = {"package": pip, "registered": why is None, **({"problem": why} if why else {})}
            if why:
                problems.append(f"{name}: {why}")
    qnn = registered.get("QNNExecutionProvider")
    if qnn and qnn["registered"]:  # which QNN backend library, and does the qnn profile's HTP take a node
        import onnxruntime_qnn

        opts = targets.load("qnn").providers[0].get("options") or {}
        why = eps.probe("QNNExecutionProvider", opts, "plugin")
        qnn["backend"] = {"type": str(opts.get("backend_type", "htp")), "library": onnxruntime_qnn.get_qnn_htp_path(),
                          "soc_model": opts.get("soc_model"), "works": why is None, **({"problem": why} if why else {})}
    report["plugins"] = registered
    devices = []
    if hasattr(ort, "get_ep_devices"):
        for d in ort.get_ep_devices():
            devices.append({"ep": d.ep_name, "ep_vendor": d.ep_vendor, "type": d.device.type.name.lower(),
                            "vendor": d.device.vendor, "device_id": d.device.device_id})
    report["ep_devices"] = devices
    for name, info in registered.items():
        if info["registered"] and not any(d["ep"] == name for d in devices):
            problems.append(f"{name}: {info['package']} is installed but found no device on this machine")
    rows = []
    for t in targets.all_targets():
        here, detail = targets.runnable(t)
        rows.append({"target": t.name, "device": t.device, "runs_here": here, "detail": detail})
    report["targets"] = rows
    report["problems"] = problems
    return report


def _build_info(ort) -> str:
    try:
        return str(ort.get_build_info())
    except Exception:  # noqa: BLE001 - older builds lack it
        return ""


def run(a: argparse.Namespace) -> int:
    from ..targets.eps import native_stdout_to_stderr

    with native_stdout_to_stderr():
        r = collect()
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    ort = r["onnxruntime"]
    out = [f"edgesdk        {r['edgesdk']}  (python {r['python']}, {r['platform']})",
           f"onnxruntime    {ort['version']}  {ort['build']}".rstrip(),
           f"packages       {', '.join(f'{k} {v}' for k, v in r['packages'].items()) or 'none'}",
           f"providers      {', '.join(r['providers'])}"]
    for name, info in r["plugins"].items():
        state = "registered" if info["registered"] else f"not registered: {info.get('problem')}"
        out.append(f"plugin         {info['package']} -> {name} ({state})")
        if "backend" in info:
            b = info["backend"]
            out.append(f"qnn backend    {b['type']} {b['library']} (soc_model {b['soc_model']}): "
                       + ("works" if b["works"] else b["problem"]))
    out.append("devices        " + ("\n               ".join(
        f"{d['ep']}: {d['type']} ({d['vendor'] or d['ep_vendor']})" for d in r["ep_devices"]) or "none listed"))
    out.append("targets")
    w = max(len(t["target"]) for t in r["targets"])
    for t in r["targets"]:
        out.append(f"  {t['target'].ljust(w)}  {t['runs_here'].ljust(8)}  {t['detail']}")
    if r["problems"]:
        out.append("problems")
        out += [f"  - {p}" for p in r["problems"]]
    else:
        out.append("problems       none found")
    print("\n".join(out))
    sys.stdout.flush()
    return 0
