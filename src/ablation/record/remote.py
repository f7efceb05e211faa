"""`make run`: pull what the DVC remote holds, compute the rest, push what was made, and say in
one line what the remote could give before any work starts.

    python -m ablation.record.remote          # what `make run` runs

A fresh machine whose default remote is not reachable (another person's server, no key, no
network) or holds nothing of this pipeline computes everything and says so in one line, instead
of ending in DVC's stack of pull and push errors; nothing is pushed where nothing could be.
"""
import json
import subprocess
import sys

from ablation.core.cli import Parser, bounded, run
from ablation.record.dvc import dvc, dvc_exe

CHECK_TIMEOUT_S = 60  # a remote that does not answer in a minute is not reachable


def default_remote():
    """(name, url) of the repository's default remote; (None, None) where there is none."""
    name = dvc(["remote", "default"]).stdout.strip()
    if not name:
        return None, None
    url = dvc(["config", f"remote.{name}.url"]).stdout.strip()  # `remote list` wraps lines
    return name, url or "?"


def last_error(text):
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("ERROR")]
    return bounded((errors or lines or ["no message"])[-1].removeprefix("ERROR: "), 200)


def cloud_status():
    """(True, {output: DVC's cloud state}) or (False, why the remote could not be read). An
    output missing from the mapping is in both caches; 'deleted' is in the remote only, 'new' in
    this clone's cache only, 'missing' in neither."""
    try:
        r = dvc(["status", "--cloud", "--json"], timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"no answer in {CHECK_TIMEOUT_S} s"
    if r.returncode != 0 or "ERROR" in r.stderr:
        return False, last_error(r.stderr or r.stdout)
    try:
        status = json.loads(r.stdout or "{}")
    except ValueError:
        return False, "dvc status --cloud printed no JSON"
    return True, status if isinstance(status, dict) else {}


def plan():
    """(pull, push, the one line): what `make run` does with the remote, decided before any
    work starts."""
    name, url = default_remote()
    if name is None:
        return False, False, ("make run: no DVC remote configured: computing everything here "
                              "(to share results: `dvc remote add -d team ssh://host/path`)")
    ok, status = cloud_status()
    where = f"'{name}' ({bounded(url, 120)})"
    if not ok:
        return False, False, (f"make run: DVC remote {where} not reachable: {status}; "
                              f"computing everything here, nothing will be pushed")
    there = [p for p, s in status.items() if s == "deleted"]
    lacking = [p for p, s in status.items() if s == "missing"]
    if not there and lacking:
        return False, True, (f"make run: nothing to pull from {where}: it holds none of the "
                             f"{len(lacking)} output(s) this clone lacks; computing them here, "
                             f"then pushing")
    if not there:
        return False, True, (f"make run: nothing to pull from {where}: this clone has every "
                             f"output it holds; running what is out of date, then pushing")
    return True, True, f"make run: pulling {len(there)} output(s) from {where}, then the rest"


def main():
    pull, push, line = plan()
    print(line, flush=True)
    rc = subprocess.call([dvc_exe(), "repro"] + (["--pull"] if pull else []))
    if rc != 0 or not push:
        return rc
    r = dvc(["push"])
    if r.returncode != 0:
        print(f"make run: computed, but the push failed: {last_error(r.stderr)}", flush=True)
        return 1
    print(f"make run: {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else 'pushed'}")
    return 0


def _cli(argv):
    Parser(prog="python -m ablation.record.remote",
           description="make run: pull, compute, push, saying first what the remote can give"
           ).parse_args(argv)
    sys.exit(main())


if __name__ == "__main__":
    run(_cli)
