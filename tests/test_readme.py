"""README is the truth: every example in it runs (the set-up block through scripts/*.sh)."""
from __future__ import annotations

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


def test_quickstart_runs():
    p = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Paris" in p.stdout
    assert (ROOT / "build" / "smollm2-int4" / "edgesdk.json").is_file()


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
    assert p.stdout.strip()
