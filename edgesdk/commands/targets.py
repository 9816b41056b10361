"""edgesdk targets [--json] | edgesdk targets show NAME [--json]"""
from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("targets", help="list target profiles and whether this machine can run them")
    p.add_argument("--json", action="store_true", help="print JSON")
    tsub = p.add_subparsers(dest="action", metavar="ACTION")
    show = tsub.add_parser("show", help="print one profile")
    show.add_argument("name", help="profile name or path to a .yaml file")
    show.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    from .. import targets

    if a.action == "show":
        t = targets.load(a.name)
        here, detail = targets.runnable(t)
        if a.json:
            print(json.dumps({**t.as_dict(), "source": t.source, "runs_here": here, "runs_here_detail": detail},
                             indent=2))
            return 0
        import yaml

        print(f"# {t.source}")
        print(yaml.safe_dump(t.as_dict(), sort_keys=False, width=100).rstrip())
        print(f"# runs here: {here} ({detail})")
        return 0
    rows = []
    for t in targets.all_targets():
        here, detail = targets.runnable(t)
        rows.append({"name": t.name, "device": t.device, "platforms": t.platforms,
                     "precision": t.export["precision"], "precisions": t.precisions,
                     "export": "yes" if t.exportable else f"not yet ({t.export.get('recipe')} recipe)",
                     "runs_here": here, "detail": detail, "description": t.description})
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ("TARGET", "DEVICE", "PLATFORMS", "PRECISION", "EXPORT", "RUNS HERE")
    table = [head] + [(r["name"], r["device"], ",".join(r["platforms"]), r["precision"],
                       "yes" if r["export"] == "yes" else "not yet", r["runs_here"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print("\nRUNS HERE: yes = its first execution provider works on this machine; fallback = it would run "
          "on a later one (see `edgesdk targets show NAME`).")
    return 0
