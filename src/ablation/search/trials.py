"""A search's trials as grid jobs and Ray tasks: names, params, the per-epoch verdict.

A trial is one setting of the space (grid/space.py) run at seed 0 with `train.trial` set to its
experiment's name, so a pruned trial's outputs never stand in DVC's run cache for a full run of
the same params; its confirmation runs are the same setting at seeds 1..n with `train.trial`
null: ordinary runs. Names follow record.run.RunId: <grid>-t<hash of the setting>[-<variant>]
-s<seed>, so the same setting is the same experiment whoever samples it, and a setting the
record holds is not run again.

On a worker node, `run_trial` runs the trial in a fresh clone (grid/clone.py) and, at each
epoch line of the train stage, asks the driver (a Mailbox actor) whether to go on, and writes
the answer where the stage waits for it ($ABLATION_TRIAL_DIR/<epoch>: stages/train.py verdict).
"""
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time

from ablation.core.io import replace_atomic
from ablation.grid.schema import Job, metric_file
from ablation.record.run import RunId
from ablation.training.overrides import apply, read_params
from ablation.training.params import PARAMS_FILE

ANSWER_WAIT_S = 300  # a worker's wait for the driver's verdict (the stage waits longer)


def row_id(setting):
    """'t' and 6 hex digits of the setting's canonical JSON: one setting, one row."""
    text = json.dumps({k: setting[k] for k in sorted(setting)}, sort_keys=True, default=str)
    return "t" + hashlib.sha256(text.encode()).hexdigest()[:6]


def job(grid, setting, seed, trial, params_path=PARAMS_FILE):
    """The Job of `setting` at `seed`: a trial (train.trial = its name) or a confirmation run."""
    rid = RunId(grid["name"], row_id(setting), grid["variant"], seed)
    over = {**grid["set"], **setting, **grid["extra_set"], "train.seed": seed,
            "train.trial": rid.name if trial else None}
    params = apply(read_params(params_path), over, f"{grid['path']}: search trial {rid.name}")
    row = {"id": rid.row, "set": dict(setting), "overrides": over, "params": params,
           "study": {}}
    return Job(rid, row, params, over, tuple(grid["targets"]))


def objective_file(grid, params):
    col = next(c for c in grid["columns"] + grid["extra"]
               if c["label"] == grid["search"]["column"])
    return metric_file(col, params), col["metric"]


class Mailbox:
    """Questions from trials (name, epoch, accuracy) and the driver's answers: a Ray actor with
    no CPU of its own, so a worker anywhere reaches the driver's pruner."""

    def __init__(self):
        self.asked, self.answers = [], {}

    def ask(self, name, epoch, accuracy):
        self.asked.append((name, epoch, accuracy))

    def questions(self):
        out, self.asked = self.asked, []
        return out

    def answer(self, name, epoch, verdict):
        self.answers[(name, epoch)] = verdict

    def answer_of(self, name, epoch):
        return self.answers.pop((name, epoch), None)


def write_verdict(folder, epoch, verdict):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(verdict)
    replace_atomic(write, os.path.join(folder, str(epoch)))


def wait_answer(ray, mailbox, name, epoch):
    """The driver's verdict on a trial's epoch; `go` where none comes in ANSWER_WAIT_S."""
    deadline = time.monotonic() + ANSWER_WAIT_S
    while time.monotonic() < deadline:
        answer = ray.get(mailbox.answer_of.remote(name, epoch))
        if answer is not None:
            return answer
        time.sleep(0.05)
    return "go"


def run_trial(spec, mailbox, events=None, collect=()):
    """One trial (or confirmation run) in a fresh clone on whatever node Ray chose; returns
    what happened, with the text of the `collect` files of the finished run."""
    import ray

    from ablation.grid.clone import run_in_clone
    where = {"host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(),
             "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
    folder = tempfile.mkdtemp(prefix="verdicts-", dir=spec.get("workdir"))

    def on_event(ev):
        if events is not None:
            events.put({"name": spec["name"], **ev})
        if ev["stage"] in (None, "train") or ev["stage"].startswith("train"):
            mailbox.ask.remote(spec["name"], ev["epoch"], ev["accuracy"])
            write_verdict(folder, ev["epoch"], wait_answer(ray, mailbox, spec["name"],
                                                           ev["epoch"]))
    try:
        return run_in_clone(spec, where, {"ABLATION_RAY_NODE_ID": where["node"],
                                          "ABLATION_TRIAL_DIR": folder}, on_event, collect)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
