"""One locked stack: requirements.lock pins every package `make install` puts in the venv, and
the venv the suite runs in is that stack (CI builds it from a clean clone with the lock)."""
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from .helpers import ROOT

LOCK = os.path.join(ROOT, "requirements.lock")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pins():
    with open(LOCK) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    bad = [line for line in lines if not PIN.match(line)]
    assert not bad, f"not NAME==VERSION: {bad[:3]}"
    return {norm(m.group(1)): m.group(2) for m in map(PIN.match, lines)}


def test_lock_pins_the_stack_pyproject_names():
    """Every dependency pyproject.toml names (the train and dev extras included) is pinned, and
    the torch pin is the one the project keeps; the base install (what a pull request's
    comparison installs) names no torch."""
    locked = pins()
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    named = project["dependencies"] + extras["train"] + extras["dev"]
    direct = {norm(re.match(r"[A-Za-z0-9._-]+", s).group()) for s in named}
    assert {"torch", "torchvision", "dvc", "ray", "pytest", "dvc-ssh"} <= direct
    assert direct <= set(locked), direct - set(locked)
    assert locked["torch"] == "2.14.1" and locked["torchvision"] == "0.29.1"
    base = {norm(re.match(r"[A-Za-z0-9._-]+", s).group()) for s in project["dependencies"]}
    assert not base & {"torch", "torchvision", "ray", "dvclive", "scikit-learn", "fvcore"}


@pytest.mark.skipif(os.environ.get("CI") != "true" and not os.environ.get("ABLATION_LOCKED"),
                    reason="a working copy's venv may predate the lock; CI builds it from it")
def test_the_venv_is_the_locked_stack():
    r = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json",
                        "--exclude-editable"], capture_output=True, text=True, check=True)
    installed = {norm(p["name"]): p["version"] for p in json.loads(r.stdout)}
    locked = pins()
    differ = {n: (v, locked.get(n)) for n, v in installed.items() if locked.get(n) != v}
    assert not differ, f"installed vs locked: {dict(list(differ.items())[:10])}"
