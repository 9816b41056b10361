"""`edgesdk doctor`: run as a subprocess, against this machine's real ONNX Runtime."""
from __future__ import annotations

import importlib.util
import json

import onnxruntime as ort

from edgesdk.targets import eps

from conftest import run_cli

HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None


def test_doctor_reports_this_machine():
    p = run_cli("doctor")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"onnxruntime    {ort.__version__}" in out
    assert "CPUExecutionProvider" in out.split("providers", 1)[1].splitlines()[0]
    for name in ("cpu", "cuda", "directml", "webgpu", "jetson", "raspberry-pi", "qnn", "openvino", "coreml"):
        assert f"\n  {name} " in out, name
    # the text lists exactly the problems the JSON report finds on this machine
    problems = json.loads(run_cli("doctor", "--json").stdout)["problems"]
    if problems:
        assert "\nproblems\n" + "".join(f"  - {x}\n" for x in problems) in out
        assert "none found" not in out
    else:
        assert "\nproblems       none found\n" in out


def test_doctor_json():
    p = run_cli("doctor", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)  # nothing else on stdout (QNN's native banner goes to stderr)
    assert r["onnxruntime"]["version"] == ort.__version__
    registered_here = {n for n in eps.PLUGINS if eps.is_plugin(n)}  # by earlier tests in this process
    assert "CPUExecutionProvider" in r["providers"] and not registered_here & set(r["providers"])
    assert set(r["providers"]) == set(ort.get_available_providers()) - registered_here
    assert r["packages"]["onnxruntime"] == ort.__version__
    assert {"ep": "CPUExecutionProvider"}.items() <= r["ep_devices"][0].items()
    rows = {t["target"]: t for t in r["targets"]}
    assert rows["cpu"]["runs_here"] == "yes" and rows["directml"]["runs_here"] == "fallback"
    assert "DmlExecutionProvider: not in this onnxruntime build" in rows["directml"]["detail"]
    assert not any("conflicting" in x for x in r["problems"])
    if HAS_QNN:
        qnn = r["plugins"]["QNNExecutionProvider"]
        assert {"package": "onnxruntime-qnn", "registered": True}.items() <= qnn.items()
        assert qnn["backend"]["type"] == "htp" and qnn["backend"]["works"] is True
        assert qnn["backend"]["library"].endswith("libQnnHtp.so") and qnn["backend"]["soc_model"] == 60
        assert any(d["ep"] == "QNNExecutionProvider" for d in r["ep_devices"])
        assert rows["qnn"]["runs_here"] == "yes"


def test_doctor_finds_conflicting_onnxruntime_wheels(tmp_path):
    """A second wheel that also provides the `onnxruntime` package, as pip records it (a
    .dist-info folder on the path), is reported with what to do about it."""
    info = tmp_path / "onnxruntime_directml-1.20.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-directml\nVersion: 1.20.1\n")
    p = run_cli("doctor", "--json", env={"PYTHONPATH": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["packages"]["onnxruntime-directml"] == "1.20.1"
    assert r["problems"][0].startswith("conflicting onnxruntime wheels installed side by side: onnxruntime, "
                                       "onnxruntime-directml")
    p = run_cli("doctor", env={"PYTHONPATH": str(tmp_path)})
    assert "  - conflicting onnxruntime wheels" in p.stdout and "pip uninstall onnxruntime onnxruntime-directml" in p.stdout
