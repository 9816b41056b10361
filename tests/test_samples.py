"""samples/ and ci/ (issue 14): every sample runs against the session's tiny artifacts, the sample
build file validates, and the CI templates parse and call only edgesdk verbs that exist."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, run_cli

SAMPLES = ROOT / "samples"
CI_FILES = [ROOT / "ci" / "github" / "build-artifacts.yml", ROOT / "ci" / "gitlab" / ".gitlab-ci.yml"]


def _sample(name: str, *args: str, input: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(SAMPLES / name), *args], capture_output=True, text=True,
                       input=input, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_chat_app_streams_and_keeps_history(tiny):
    p = _sample("chat_app.py", str(tiny.export("llama", "fp32")), "--max-new-tokens", "5",
                input="Hello there\n\nAnd again?\n")
    replies = [line for line in p.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2 and all(len(r) > len("assistant> ") for r in replies)
    assert p.stdout.count(" tokens, ") == 2
    assert "5 messages in the history" in p.stdout  # system + 2 x (user, assistant)


def test_speculative_pair_gives_the_target_text(tiny):
    art = str(tiny.export("llama", "fp32"))  # the same weights as draft: every drafted token is accepted
    p = _sample("speculative_pair.py", art, art, "Hi", "--max-new-tokens", "12")
    assert "same text as the target alone: True" in p.stdout
    m = re.search(r"acceptance (\d+)% \((\d+)/(\d+) drafted tokens\)", p.stdout)
    assert m and int(m.group(3)) > 0 and m.group(1) == "100", p.stdout


def test_sample_build_file_ships_on_three_devices():
    p = run_cli("build", str(SAMPLES / "build.yaml"), "--list")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["include"]
    assert [(r["target"], r["precision"]) for r in rows] == [("cpu", "int4"), ("directml", "int4"), ("qnn", "int8")]
    assert rows[2]["options"] == {"chunk": 64, "context_length": 512}
    assert not (SAMPLES / "dist").exists()  # listing builds nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_client_against_edgesdk_serve(tiny):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    import httpx

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "edgesdk", "serve", str(tiny.export("llama", "fp32")),
                               "--port", str(port), "--alias", "tiny"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while True:
            assert server.poll() is None and time.time() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        p = _sample("serve_client.py", "--base-url", url + "/v1", "--max-tokens", "4", timeout=120)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(20)
    assert "model: tiny" in p.stdout
    answers = [line for line in p.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(answers) == 2 and all(len(a) > len("assistant> ") for a in answers)
    assert "(4 tokens, finish_reason=length)" in p.stdout
    assert "5 messages in the history" in p.stdout


def _commands(node) -> list[str]:
    """Every shell line in a CI file: GitHub `run:` values and GitLab `script:` items."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("run", "script", "before_script", "after_script"):
                out += [v] if isinstance(v, str) else [x for x in v if isinstance(x, str)]
            else:
                out += _commands(v)
    elif isinstance(node, list):
        for v in node:
            out += _commands(v)
    return out


@pytest.mark.parametrize("path", CI_FILES, ids=lambda p: p.name)
def test_ci_templates_parse_and_call_existing_verbs(path):
    from edgesdk.cli import build_parser

    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    verbs = set(sub.choices)
    # `edgesdk VERB` where a shell command starts (not `pip install edgesdk onnxruntime-directml`)
    starts = r"(?:^|[;&|({]|\$\(|\bdo\b|\bthen\b)\s*"
    calls = re.findall(starts + r"edgesdk ([a-z][a-z-]*)", "\n".join(_commands(doc)), flags=re.M)
    assert {"build", "package", "sign"} <= set(calls), calls
    for verb in calls:
        assert verb in verbs, f"{path.name} calls `edgesdk {verb}`, which does not exist"
    # every option given to `edgesdk build` exists too
    build_opts = {o for a in sub.choices["build"]._actions for o in a.option_strings}
    for line in _commands(doc):
        for m in re.finditer(r"edgesdk build [^\n;|&]*", line):
            for opt in re.findall(r"(?<!\S)(--[a-z-]+)", m.group(0)):
                assert opt in build_opts, f"{path.name}: `edgesdk build {opt}` does not exist"
    if "jobs" in doc:  # GitHub: the matrix comes from `edgesdk build --list`, a Windows job runs DirectML
        assert "--list" in "\n".join(_commands(doc["jobs"]["matrix"]))
        assert doc["jobs"]["smoke-directml"]["runs-on"].startswith("windows")
        assert "fromJSON(needs.matrix.outputs.matrix)" in doc["jobs"]["build"]["strategy"]["matrix"]
