"""The models this repository keeps, by name, and their versions and stages as git tags.

Each dataset x train.models (its export folder) and each dataset x svm.kernels (its .npz) is a
kept model; its name (core.outputs.artifact_name) is its entry in dvc.yaml's `artifacts:`,
which `dvc artifacts get` and DVC Studio read. Versions and stages are GTO's git tags
(`<name>@v1.2.0`, `<name>#prod#3`), which `dvc artifacts get --rev/--stage` resolves.

GTO itself tags any commit. `register` first checks what a version promises: the commit is the
current one with nothing uncommitted (the metrics, dvc.lock, params and code a version names
are the ones in git), `dvc status` of the stages that make the model is clean (the weights in
the workspace, and so in the cache, are the ones dvc.lock records), and the run's record says
it finished: not diverged, not pruned. Each refusal is one line and exit status 2.
"""
import contextlib
import json
import os
import subprocess
from typing import NamedTuple

from ablation.core.cli import UserError, bounded, read_config
from ablation.core.outputs import artifact_name, artifact_path, metrics_path, record_path
from ablation.training.params import PARAMS_FILE
from ablation.training.params import load as load_params

STAGES = ("dev", "prod")  # the stages a version may be assigned (`promote`)
DVC_YAML = "dvc.yaml"


class Kept(NamedTuple):
    """One kept model: its artifact name, the stage and the unit that make it."""
    name: str
    stage: str  # train | svm
    dataset: str
    unit: str  # the architecture or the SVM kernel
    path: str  # what the artifact names
    metrics: str  # the run's metrics JSON (git-tracked)

    @property
    def stages(self):
        """The dvc.yaml stage runs whose outputs this model is."""
        unit = f"{self.dataset}-{self.unit}"
        return [f"train@{unit}", f"export@{unit}"] if self.stage == "train" else [f"svm@{unit}"]


def kept(params_file=PARAMS_FILE):
    """Every kept model, from params.yaml's lists (the matrices of dvc.yaml's stages)."""
    p = load_params(["data", "train", "svm"], params_file)
    out = []
    for stage, section, key in (("train", "train", "models"), ("svm", "svm", "kernels")):
        for ds in p["data"]["datasets"]:
            for unit in p[section][key]:
                out.append(Kept(artifact_name(stage, ds, unit), stage, ds, unit,
                                artifact_path(stage, ds, unit), metrics_path(stage, ds, unit)))
    return out


def declared(dvc_yaml=DVC_YAML):
    """dvc.yaml's `artifacts:` section: {name: entry}."""
    doc = read_config(dvc_yaml)
    arts = doc.get("artifacts") if isinstance(doc, dict) else None
    return arts if isinstance(arts, dict) else {}


def check_here():
    """The commands run at the top of this repository: params.yaml, dvc.yaml and git there."""
    for f in (PARAMS_FILE, DVC_YAML):
        if not os.path.isfile(f):
            raise UserError(f"{f}: file not found (run python -m ablation.models at the "
                            f"repository's top)")
    r = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if r.returncode != 0 or os.path.realpath(r.stdout.strip()) != os.path.realpath("."):
        raise UserError("not the top of a git repository: versions and stages are git tags")


def find(name):
    """The kept model called `name`; a name that is none is one UserError listing them."""
    models = {m.name: m for m in kept()}
    if name not in models:
        raise UserError(f"{DVC_YAML}: no artifact {bounded(repr(name), 80)} (kept models: "
                        f"{', '.join(models)})")
    if name not in declared():
        raise UserError(f"{DVC_YAML}: artifacts: has no entry {name!r}; add it (path "
                        f"{models[name].path}, type model)")
    return models[name]


def git(*args, check=True):
    r = subprocess.run(["git", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise UserError(f"git {' '.join(args[:2])}: {bounded(r.stderr.strip(), 300)}")
    return r.stdout.strip()


def uncommitted():
    """Tracked files that differ from HEAD, and untracked files outside .gitignore."""
    r = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
    return [line[3:] for line in r.stdout.splitlines() if line.strip()]


def dvc_dirty(model):
    """What `dvc status` reports for the stages that make `model` ({stage: changes})."""
    from dvc.repo import Repo
    with Repo(".") as repo:
        return repo.status(targets=model.stages)


def record_of(model):
    """The run's committed metrics and record (the file in HEAD, not the workspace's)."""
    out = {}
    for path in (model.metrics, record_path(model.metrics)):
        text = git("show", f"HEAD:{path}", check=False)
        if not text:
            raise UserError(f"{path}: not committed; commit the run's metrics (make run "
                            f"writes them) before registering {model.name}")
        try:
            out.update(json.loads(text[:1 << 20]))
        except ValueError:
            raise UserError(f"{path}: not JSON in HEAD") from None
    return out


def check_registrable(model):
    """Refuse, with one line, a version that would not be what it names (module docstring);
    return the committed record of its run."""
    dirty = uncommitted()
    if dirty:
        raise UserError(f"uncommitted changes ({bounded(', '.join(dirty), 200)}): commit them "
                        f"first; a version names a commit")
    rec = record_of(model)
    if rec.get("diverged"):
        raise UserError(f"{model.metrics}: diverged is true (epoch "
                        f"{rec.get('diverged_epoch')}): a diverged run is no model to register")
    if rec.get("pruned"):
        raise UserError(f"{model.metrics}: pruned is true: a stopped run is no model to register")
    changed = dvc_dirty(model)
    if changed:
        raise UserError(f"dvc status: {bounded(json.dumps(changed, sort_keys=True), 300)} for "
                        f"{', '.join(model.stages)}: run `make run` (or `dvc pull`), commit "
                        f"dvc.lock, then register")
    return rec


def _repo():
    return os.getcwd()


@contextlib.contextmanager
def gto_errors():
    """GTO's refusals (a version that exists, a push the remote rejects) as one line."""
    from gto.exceptions import GTOException
    try:
        yield
    except GTOException as e:
        raise UserError(f"gto: {bounded(str(e), 300)}") from None


def register(name, version=None, push=False):
    """Tag the current commit as a version of `name` (GTO's next one where `version` is None);
    return the version."""
    import gto.api
    model = find(name)
    rec = check_registrable(model)
    head = git("rev-parse", "HEAD")
    here = [v for v in versions_of(name) if git("rev-list", "-n1", f"{name}@{v}") == head]
    if here:
        raise UserError(f"{name}: this commit is already version {here[-1]}")
    with gto_errors():
        r = gto.api.register(_repo(), name, "HEAD", version=version, stdout=False,
                             message=f"{name}: test accuracy {rec.get('test_accuracy')}% "
                                     f"(the record at this commit)")
    if push:
        push_tag(f"{name}@{r.version}")
    return r.version

def promote(name, stage, version=None, push=False):
    """Assign `stage` to a version of `name` (its latest where `version` is None)."""
    import gto.api
    if stage not in STAGES:
        raise UserError(f"stage {bounded(repr(stage), 40)}: allowed {', '.join(STAGES)}")
    find(name)
    versions = versions_of(name)
    if not versions:
        raise UserError(f"{name}: no version registered yet (python -m ablation.models "
                        f"register {name})")
    version = version or versions[-1]
    if version not in versions:
        raise UserError(f"{name}: no version {bounded(version, 40)} (registered: "
                        f"{', '.join(versions)})")
    with gto_errors():
        gto.api.assign(_repo(), name, stage, version=version, stdout=False,
                       message=f"{name} {version} to {stage}")
    if push:
        tags = git("tag", "--list", f"{name}#{stage}#*").splitlines()
        push_tag(max(tags, key=lambda t: int(t.rpartition("#")[2])))
    return version


def push_tag(tag):
    """`git push origin <tag>`: git's own transport, so the user's SSH setup (keys, config,
    GIT_SSH_COMMAND) applies as for any push."""
    r = subprocess.run(["git", "push", "-q", "origin", f"refs/tags/{tag}"], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise UserError(f"git push origin {tag}: {bounded(r.stderr.strip(), 300)} (the tag is "
                        f"kept here: push it with the same command)")


def _sem(v):
    return tuple(int(x) for x in v.lstrip("v").split("."))


def versions_of(name):
    """The registered versions of `name`, oldest first."""
    tags = git("tag", "--list", f"{name}@v*").splitlines()
    return sorted((t.partition("@")[2] for t in tags), key=_sem)


def table():
    """(name, latest version, the version each of STAGES holds, path): one a kept model."""
    import gto.api
    state = gto.api.show(_repo(), table=False) or {}
    rows = []
    for m in kept():
        s = state.get(m.name) or {}
        held = s.get("stage") or {}
        rows.append((m.name, s.get("version") or "-", *(held.get(st) or "-" for st in STAGES),
                     m.path))
    return rows
