"""`python -m ablation.models`: the kept models, their versions and stages, their cards.

    python -m ablation.models list
    python -m ablation.models register NAME [--version vX.Y.Z] [--push]
    python -m ablation.models promote NAME STAGE [--version vX.Y.Z] [--push]
    python -m ablation.models card [NAME ...] [--check]

`register` tags the current commit as a version of NAME once the checks of models/registry.py
pass (committed, `dvc status` clean, the run finished); `promote` assigns dev or prod to a
version (the latest by default); --push sends the tag to the git remote `origin`, where
`dvc artifacts get REPO NAME --stage prod` finds it. `card` writes reports/models/NAME.md from
the record; --check writes nothing and exits 1 where a card is stale.
"""
import re
import sys

from ablation.core.cli import Parser, UserError, bounded
from ablation.models import card, registry

VERSION_RE = re.compile(r"^v\d{1,6}\.\d{1,6}\.\d{1,6}$")


def version_arg(v):
    if not VERSION_RE.match(v):
        raise UserError(f"--version {bounded(repr(v), 40)}: expected vMAJOR.MINOR.PATCH "
                        f"(v1.0.0)")
    return v


def parser():
    ap = Parser(prog="python -m ablation.models",
                description="The kept models: list, register a version, promote, write cards")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every kept model, its latest version and stages")
    r = sub.add_parser("register", help="tag the current commit as a version of NAME")
    r.add_argument("name")
    p = sub.add_parser("promote", help="assign a stage to a version (the latest by default)")
    p.add_argument("name")
    p.add_argument("stage", help=f"one of {', '.join(registry.STAGES)}")
    for s in (r, p):
        s.add_argument("--version", type=version_arg, help="vMAJOR.MINOR.PATCH")
        s.add_argument("--push", action="store_true", help="push the tag to origin")
    c = sub.add_parser("card", help="write reports/models/NAME.md from the record")
    c.add_argument("names", nargs="*", help="kept models (default: all)")
    c.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    for s in (r, p, c):
        s.error = ap.error
    return ap


def cli(argv):
    a = parser().parse_args(argv)
    registry.check_here()
    if a.command == "list":
        rows = [("name", "latest", *registry.STAGES, "path"), *registry.table()]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    elif a.command == "register":
        v = registry.register(a.name, a.version, a.push)
        print(f"{a.name} {v}: registered at this commit (tag {a.name}@{v}"
              f"{', pushed' if a.push else ''})")
    elif a.command == "promote":
        v = registry.promote(a.name, a.stage, a.version, a.push)
        print(f"{a.name} {v}: now {a.stage}{' (pushed)' if a.push else ''}")
    else:
        for n in a.names:
            registry.find(n)
        changed = card.write_cards(a.names or None, check=a.check)
        verb = "stale" if a.check else "wrote"
        print("\n".join(f"{verb} {p}" for p in changed) or "every card is up to date")
        if a.check and changed:
            sys.exit(1)
