"""Target profiles (YAML data in profiles/) and execution-provider resolution.

A profile names the graph recipe, precision and IO dtype an export uses, and the ordered list
of execution providers (with options) a runtime tries. ``resolve`` turns an artifact's list
and what this machine has into the providers a session is created with, plus one note per
provider it skipped and why.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidArgumentError, TargetError
from . import eps

PROFILE_DIR = Path(__file__).parent / "profiles"
PRECISIONS = ("int4", "int8", "fp16", "fp32")
DEVICES = ("cpu", "gpu", "npu")


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

    @property
    def exportable(self) -> bool:
        return self.export.get("recipe", "builder") in ("builder", "static")

    def as_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "description": self.description, "device": self.device,
             "platforms": self.platforms, "architectures": self.architectures,
             "export": self.export, "runtime": self.runtime}
        return {k: v for k, v in d.items() if v or k in ("export", "runtime")}


# -- schema -------------------------------------------------------------------------------------
# key -> (type(s), required). A nested dict schema validates a mapping value.
_STR, _INT, _BOOL, _LIST = str, int, bool, list
_QUANT = {"block_size": (_INT, False), "accuracy_level": (_INT, False), "algorithm": (_STR, False),
          "symmetric": (_BOOL, False), "mixed_precision": ((dict, str), False), "gguf_blocks": (_BOOL, False)}
_SCHEMA: dict[str, Any] = {
    "name": (_STR, True),
    "description": (_STR, False),
    "device": (_STR, True),
    "platforms": (_LIST, False),
    "architectures": (_LIST, False),
    "export": ({
        "recipe": (_STR, False),
        "execution_provider": (_STR, True),
        "precision": (_STR, True),
        "precisions": (_LIST, False),
        "io_dtype": (_STR, False),
        "context_length": (_INT, False),
        "chunk": (_INT, False),  # static recipe: prefill chunk S (context_length is its context C)
        "int4": (_QUANT, False),
        "int8": (_QUANT, False),
        "builder_options": (dict, False),
    }, True),
    "runtime": ({
        "providers": (_LIST, True),
        "kv_cache": (_STR, False),
        "threads": (_INT, False),
    }, True),
}
_PROVIDER = {"name": (_STR, True), "options": (dict, False), "device": (_STR, False)}
_CHOICES = {
    "device": DEVICES,
    "platforms": ("linux", "windows", "macos", "android", "ios", "web"),
    "architectures": ("x86_64", "arm64"),
    "export.recipe": ("builder", "static"),
    "export.execution_provider": ("cpu", "cuda", "dml", "webgpu", "qnn", "openvino", "coreml"),
    "export.precision": PRECISIONS,
    "export.precisions": PRECISIONS,
    "export.io_dtype": ("float32", "float16", "bfloat16"),
    "runtime.kv_cache": ("shared-buffer",),
}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a mapping"}


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return "a mapping" if isinstance(t, dict) else _TYPE_NAMES.get(t, t.__name__)


def _check(data: Any, schema: dict, where: str, src: str) -> None:
    if not isinstance(data, dict):
        raise TargetError(f"profile {src}: {where or 'the file'} must be a mapping, not {type(data).__name__}")
    for key in data:
        if key not in schema:
            near = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f"; allowed: {', '.join(schema)}"
            raise TargetError(f"profile {src}: unknown key '{where}{key}'{hint}")
    for key, (typ, required) in schema.items():
        path = f"{where}{key}"
        if key not in data or data[key] is None:
            if required:
                raise TargetError(f"profile {src}: '{path}' is missing")
            continue
        value = data[key]
        if isinstance(typ, dict):
            _check(value, typ, f"{path}.", src)
            continue
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if not ok:
            raise TargetError(f"profile {src}: '{path}' must be {_type_name(typ)}, not {value!r}")
        allowed = _CHOICES.get(path)
        if allowed:
            for v in value if isinstance(value, list) else [value]:
                if v not in allowed:
                    raise TargetError(f"profile {src}: '{path}' has '{v}'; use one of {', '.join(allowed)}")


def _check_providers(providers: list, src: str) -> None:
    if not providers:
        raise TargetError(f"profile {src}: 'runtime.providers' is empty; list at least CPUExecutionProvider")
    for i, p in enumerate(providers):
        _check(p, _PROVIDER, f"runtime.providers[{i}].", src)
        name = p["name"]
        if name not in eps.KNOWN:
            near = _nearest(name, list(eps.KNOWN), 1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise TargetError(f"profile {src}: unknown execution provider '{name}'; {hint}"
                              f"known: {', '.join(eps.KNOWN)}")
        if p.get("device") is not None and p["device"] not in DEVICES:
            raise TargetError(f"profile {src}: 'runtime.providers[{i}].device' has '{p['device']}'; "
                              f"use one of {', '.join(DEVICES)}")
        for k, v in (p.get("options") or {}).items():
            if isinstance(v, (dict, list)) or v is None:
                raise TargetError(f"profile {src}: option '{k}' of {name} must be a string, number or boolean")


def parse(data: Any, source: str) -> Target:
    """Validate a profile document; every problem is one line naming the file and the key."""
    _check(data, _SCHEMA, "", source)
    _check_providers(data["runtime"]["providers"], source)
    exp = data["export"]
    if exp.get("precisions") and exp["precision"] not in exp["precisions"]:
        raise TargetError(f"profile {source}: 'export.precision' {exp['precision']} is not in "
                          f"'export.precisions' ({', '.join(exp['precisions'])})")
    if exp.get("chunk") is not None and (exp["chunk"] < 1 or exp["chunk"] > (exp.get("context_length") or exp["chunk"])):
        raise TargetError(f"profile {source}: 'export.chunk' {exp['chunk']} must be between 1 and "
                          f"'export.context_length' ({exp.get('context_length')})")
    return Target(name=data["name"], description=data.get("description", ""), device=data["device"],
                  platforms=list(data.get("platforms") or []), export=dict(exp),
                  runtime=dict(data["runtime"]), architectures=list(data.get("architectures") or []),
                  source=source)


def _nearest(word: str, choices: list[str], n: int) -> list[str]:
    """Closest names, ignoring case (a user types CudaExecutionProvider or DirectML)."""
    lower = {c.lower(): c for c in choices}
    if word.lower() in lower:
        return [lower[word.lower()]]
    return [lower[m] for m in difflib.get_close_matches(word.lower(), list(lower), n=n, cutoff=0.4)]


# -- finding profiles ---------------------------------------------------------------------------
def _profile_files() -> dict[str, Path]:
    """Built-in profiles, then each folder of $EDGESDK_PROFILES (later ones override by name)."""
    files = {p.stem: p for p in sorted(PROFILE_DIR.glob("*.yaml"))}
    extra = os.environ.get("EDGESDK_PROFILES")
    if extra:
        for folder in extra.split(os.pathsep):
            if folder:
                for p in sorted(Path(folder).glob("*.yaml")) + sorted(Path(folder).glob("*.yml")):
                    files[p.stem] = p
    return files


def names() -> list[str]:
    return list(_profile_files())


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
            near = _nearest(name_or_path, list(files), 3)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise TargetError(f"unknown target '{name_or_path}'; {hint}known targets: {', '.join(files)}")
        path = files[name_or_path]
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise TargetError(f"profile {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    return parse(data, str(path))


def all_targets() -> list[Target]:
    return [load(str(p)) for p in _profile_files().values()]


# -- resolution ---------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a runtime should do: providers to try in order, notes on what was skipped, settings."""
    providers: list[tuple[str, dict[str, Any]]]
    notes: list[str]
    threads: int | None = None
    target: str = ""


def _prefer_key(prefer: str | None):
    if prefer is None:
        return None
    p = prefer.strip()
    if p.lower() in DEVICES:
        return lambda e: eps.device_of(e) == p.lower()
    by_short = {info.short.lower(): name for name, info in eps.KNOWN.items() if info.short}
    name = p if p in eps.KNOWN else by_short.get(p.lower())
    if name is None:
        raise InvalidArgumentError(f"prefer='{prefer}' is not a device (cpu, gpu, npu) or an execution provider "
                                   f"name (e.g. QNNExecutionProvider, cuda, dml)")
    return lambda e: e["name"] == name


def plan(manifest: dict[str, Any], target: str = "auto", strict: bool = False,
         prefer: str | None = None) -> Plan:
    """The providers to create a session with for an artifact, best first.

    target="auto" takes the providers the artifact was built for and orders them NPU, then GPU,
    then CPU; a target name uses that profile's list in its own order. ``prefer`` (a device
    kind or an EP name) moves matching entries to the front. Entries this machine lacks are
    skipped with a note; ``strict=True`` raises instead of skipping the best one.
    """
    rt = manifest.get("runtime") or {}
    if target in (None, "", "auto"):
        wanted = list(rt.get("providers") or [{"name": eps.CPU}])
        wanted.sort(key=lambda e: eps.DEVICE_ORDER.get(eps.device_of(e), 3))  # stable: profile order within a kind
        threads, label = rt.get("threads"), manifest.get("target", "?")
    else:
        prof = load(target)
        wanted, threads, label = prof.providers, prof.runtime.get("threads"), prof.name
        for p in wanted:
            if p["name"] not in eps.KNOWN:
                raise TargetError(f"unknown execution provider '{p['name']}' in profile {prof.name}")
    notes: list[str] = []
    key = _prefer_key(prefer)
    if key is not None:
        front = [e for e in wanted if key(e)]
        if not front:
            notes.append(f"prefer={prefer}: the {label} providers have none of that kind; ignored")
        wanted = front + [e for e in wanted if not key(e)]
    chosen: list[tuple[str, dict[str, Any]]] = []
    for e in wanted:
        how, why = eps.availability(e)
        if how is None:
            if strict and not chosen:
                raise TargetError(f"artifact built for {manifest.get('target', '?')} cannot use {e['name']} here "
                                  f"and strict=True forbids falling back: {why}")
            if not chosen:  # a missing fallback after the chosen provider is not worth a note
                notes.append(f"skipped {e['name']}{_dev(e)}: {why}")
            continue
        chosen.append((e["name"], dict(e.get("options") or {})))
        if strict:
            break  # strict: the best provider alone, no fallback
    if not chosen:
        chosen = [(eps.CPU, {})]
        notes.append(f"none of the {label} providers is available; using {eps.CPU}")
    return Plan(chosen, notes, threads, label)


def _dev(e: dict[str, Any]) -> str:
    dt = (e.get("options") or {}).get("device_type")
    return f" ({dt})" if dt else ""


def resolve(manifest: dict[str, Any], target: str = "auto", strict: bool = False,
            prefer: str | None = None) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """The ordered providers to create a session with, and notes on what was skipped and why."""
    p = plan(manifest, target, strict=strict, prefer=prefer)
    return p.providers, p.notes


def runnable(t: Target) -> tuple[str, str]:
    """("yes" | "fallback" | "no", detail): can this machine run the profile's first provider?"""
    first = t.providers[0]
    how, why = eps.availability(first)
    if how is not None and first["name"] != eps.CPU:
        why = eps.probe(first["name"], first.get("options"), how)
        how = None if why else how
    if how is not None:
        return "yes", first["name"] + _dev(first)
    for e in t.providers[1:]:
        if eps.availability(e)[0] is not None:
            return "fallback", f"{first['name']}{_dev(first)}: {why}; would run on {e['name']}{_dev(e)}"
    return "no", f"{first['name']}: {why}"


def report(log, path, providers: list[str], notes: list[str]) -> None:
    """The one log line a load writes: what runs the model and, if anything was skipped, why."""
    msg = f"{Path(path).name}: running on {providers[0]}"
    if notes:
        log.warning(f"{msg}; {'; '.join(notes)}")
    else:
        log.info(msg)
