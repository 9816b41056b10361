"""Target profiles (YAML data in profiles/) and execution-provider resolution."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import TargetError

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass
class Target:
    name: str
    description: str
    device: str
    platforms: list[str]
    export: dict[str, Any]
    runtime: dict[str, Any]
    architectures: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def precisions(self) -> list[str]:
        return list(self.export.get("precisions") or [self.export["precision"]])

    @property
    def providers(self) -> list[dict[str, Any]]:
        return list(self.runtime.get("providers", []))


def _profile_files() -> dict[str, Path]:
    files = {p.stem: p for p in sorted(PROFILE_DIR.glob("*.yaml"))}
    extra = os.environ.get("EDGESDK_PROFILES")
    if extra:
        for folder in extra.split(os.pathsep):
            for p in sorted(Path(folder).glob("*.yaml")):
                files[p.stem] = p
    return files


def names() -> list[str]:
    return list(_profile_files())


def parse(data: Any, source: str) -> Target:
    if not isinstance(data, dict):
        raise TargetError(f"profile {source} is not a YAML mapping")
    for key in ("name", "device", "export", "runtime"):
        if key not in data:
            raise TargetError(f"profile {source} has no '{key}'")
    return Target(name=data["name"], description=data.get("description", ""), device=data["device"],
                  platforms=list(data.get("platforms", [])), export=dict(data["export"]),
                  runtime=dict(data["runtime"]), architectures=list(data.get("architectures", [])), source=source)


def load(name_or_path: str) -> Target:
    """A profile by name (built in or from $EDGESDK_PROFILES) or by path to a .yaml file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise TargetError(f"profile file {p} does not exist")
        path = p
    else:
        files = _profile_files()
        if name_or_path not in files:
            near = difflib.get_close_matches(name_or_path, list(files), n=3, cutoff=0.4)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise TargetError(f"unknown target '{name_or_path}'; {hint}known targets: {', '.join(files)}")
        path = files[name_or_path]
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TargetError(f"profile {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse(data, str(path))


def resolve(manifest: dict[str, Any], target: str = "auto", strict: bool = False,
            prefer: str | None = None) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """The ordered providers to create a session with, and notes on what was skipped and why."""
    import onnxruntime as ort

    if target == "auto":
        wanted = manifest.get("runtime", {}).get("providers") or [{"name": "CPUExecutionProvider"}]
    else:
        wanted = load(target).providers
    available = set(ort.get_available_providers())
    chosen, notes = [], []
    for p in wanted:
        if p["name"] in available:
            chosen.append((p["name"], dict(p.get("options") or {})))
        else:
            notes.append(f"skipped {p['name']}: not in this onnxruntime build")
    if strict and notes:
        raise TargetError(f"artifact built for {manifest.get('target')} cannot run as requested here: {notes[0]}")
    if not chosen:
        chosen = [("CPUExecutionProvider", {})]
        notes.append("no provider of the profile is available; falling back to CPUExecutionProvider")
    return chosen, notes
