"""`python -m ablation.grid search GRID`: search a grid file's space with Optuna, every trial an
ordinary DVC experiment run by Ray, hopeless trials pruned after an epoch, the best settings
confirmed against seed noise.

Why Ray, on one machine too: the pruner must hear each epoch of a running trial and answer
before the next one starts. A Ray task streams the train stage's epoch lines and asks the
driver (search/trials.py Mailbox); DVC's queue runs its workers detached with no such channel.
One machine starts a local Ray instance (as `grid run` does); `--address` joins a cluster.
Each trial is a Ray task holding its train.threads CPUs (the core pool holds the cores besides),
so trials never oversubscribe a node.

The study (Optuna's ask-and-tell: TPE or random sampler, median or Hyperband pruner) lives in a
journal file the search owns, .search/<grid>[-<variant>].journal, one driver at a time (an
flock beside it). Stopped by Ctrl-C or SIGTERM, it cancels its tasks (each keeps its finished
epochs in its node's checkpoint store) and marks their trials failed and queued again; a driver
that died leaves them running, and the next start does the same. Either way the same command
resumes: the re-queued settings run first, as the same experiments, from their last epoch; only
trials that finished or were pruned count against the budget, so none counts twice. A setting
the record (DVC's experiments, reports/<grid>.json) already holds at the same params and seed
is told from the record, not run; a setting the sampler proposes again is told its outcome
again and not counted.
"""
import os
import shutil
import tempfile

from ablation.core.cli import UserError, bounded, catch_interrupts
from ablation.core.io import OutputLock
from ablation.grid import ray as cluster
from ablation.grid.clone import check_commit, spec_of
from ablation.grid.queue import known_runs
from ablation.grid.schema import differences, relevant_keys
from ablation.grid.space import settings
from ablation.search.budget import Budget
from ablation.search.trials import Mailbox, job, objective_file, run_trial

JOURNAL_DIR = ".search"
MAX_REPEATS = 50  # proposals in a row of settings already run: the space is used up


def journal_path(grid):
    return os.path.join(JOURNAL_DIR, grid["name"] + (f"-{grid['variant']}" if grid["variant"]
                                                     else "") + ".journal")


def distributions(space):
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )
    out = {}
    for key, dim in space.items():
        if dim[0] == "values":
            out[key] = CategoricalDistribution(dim[1])
        elif dim[4]:
            out[key] = IntDistribution(dim[1], dim[2], log=dim[3])
        else:
            out[key] = FloatDistribution(dim[1], dim[2], log=dim[3])
    return out


def make_study(grid, path, epochs):
    """The grid's study in its journal (created or loaded)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    s = grid["search"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=s["sampler_seed"], n_startup_trials=min(
        10, max(2, s["trials"] // 3))) if s["sampler"] == "tpe" else \
        optuna.samplers.RandomSampler(seed=s["sampler_seed"])
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(
                  min_resource=1, max_resource=max(1, epochs), reduction_factor=3),
              "none": optuna.pruners.NopPruner}[s["pruner"]]()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return optuna.create_study(study_name=os.path.basename(path)[:-len(".journal")],
                               storage=JournalStorage(JournalFileBackend(path)),
                               sampler=sampler, pruner=pruner, direction=s["direction"],
                               load_if_exists=True)


def recover(study):
    """Trials a dead driver left running: failed, their settings queued to run first."""
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)
        print(f"trial {t.number} ({t.user_attrs.get('experiment', '?')}) was running when its "
              f"driver stopped: queued again")


class Search:
    """The ask-and-tell loop over Ray tasks."""

    def __init__(self, ray, grid, study, budget, ctx):
        self.ray, self.grid, self.study, self.budget, self.ctx = ray, grid, study, budget, ctx
        self.dists = distributions(grid["search"]["space"])
        self.pending = {}  # Ray ref -> (trial, job)
        self.live = {}  # experiment name -> trial, while running
        self.known = known_runs(grid)
        self.keys = relevant_keys(grid)
        self.repeats = 0

    def outcome(self, values, key):
        """(state, value) of a finished trial from its metrics."""
        from optuna.trial import TrialState
        v = values.get(key)
        if values.get("pruned"):
            return TrialState.PRUNED, None
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return TrialState.FAIL, None  # diverged: no accuracy
        return TrialState.COMPLETE, float(v)

    def tell(self, trial, job, values, ran):
        state, value = self.outcome(values, objective_file(self.grid, job.params)[1])
        for k, v in (("experiment", job.name), ("row", job.id.row), ("ran", ran),
                     ("epochs", values.get("epochs_completed")),
                     ("train_s", (values.get("train_time_ms") or 0) / 1000),
                     ("train_images", values.get("train_images"))):
            trial.set_user_attr(k, v)
        self.study.tell(trial, value, state=state)
        self.budget.told(trial.user_attrs, state, trial.number, value)
        what = f" {value:.2f}" if value is not None else \
            f" after epoch {values.get('epochs_completed')}"
        print(f"{job.name}: {state.name.lower()}{what}{'' if ran else ' (from the record)'}",
              flush=True)

    def recorded(self, job):
        run = self.known.get(job.name)
        if run is None or run.state != "success" or differences(run.params, job.params,
                                                                self.keys):
            return None
        return run.values(objective_file(self.grid, job.params)[0])

    def launch(self):
        """Ask for one setting and start it; False where nothing can start now."""
        trial = self.study.ask(self.dists)
        setting = dict(trial.params)
        j = job(self.grid, setting, 0, trial=True)
        done = self.budget.done_rows.get(j.id.row)
        if done is not None:  # proposed again: its outcome again, not counted
            self.repeats += 1
            trial.set_user_attr("repeat_of", done)
            self.study.tell(trial, self.budget.value_of(done), state=self.budget.state_of(done))
            return self.repeats < MAX_REPEATS
        if j.name in self.live:
            from optuna.trial import TrialState
            trial.set_user_attr("repeat_of_running", j.name)
            self.study.tell(trial, state=TrialState.FAIL)
            return False
        self.repeats = 0
        if (values := self.recorded(j)) is not None:
            self.tell(trial, j, values, ran=False)
            return True
        self.start(trial, j)
        return True

    def start(self, trial, j):
        """Start job `j` as a Ray task: a trial's (`trial`) or a confirmation run (None)."""
        ray, ctx = self.ray, self.ctx
        spec = spec_of(j, ctx["commit"], ctx["remote"], ctx["dvc_remote"], ctx["cpus"],
                       ctx["env"], ctx["workdir"])
        path = objective_file(self.grid, j.params)[0]
        task = ray.remote(run_trial).options(num_cpus=ctx["cpus"], num_gpus=0,
                                             max_retries=cluster.RETRIES,
                                             retry_exceptions=False, scheduling_strategy="SPREAD")
        ref = task.remote(spec, ctx["mailbox"], None, (path,))
        self.pending[ref], self.live[j.name] = (trial, j), trial
        if trial is None:  # a confirmation run: never pruned
            print(f"confirm: {j.name}", flush=True)
            return
        trial.set_user_attr("experiment", j.name)
        print(f"trial {trial.number}: {j.name} " + " ".join(
            f"{k}={v}" for k, v in trial.params.items()), flush=True)

    def answer(self):
        """The pruner's verdict on every epoch the trials reported since the last look."""
        for name, epoch, acc in self.ray.get(self.ctx["mailbox"].questions.remote()):
            trial = self.live.get(name)
            verdict = "go"
            if trial is not None:
                trial.report(acc, epoch)
                verdict = "stop" if trial.should_prune() else "go"
            self.ctx["mailbox"].answer.remote(name, epoch, verdict)

    def collect(self, timeout=1.0):
        done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        for ref in done:
            trial, j = self.pending.pop(ref)
            del self.live[j.name]
            res = cluster.finish(self.ray, ref, j.name, self.ctx["remote"])
            text = (res.get("files") or {}).get(objective_file(self.grid, j.params)[0])
            if trial is None:
                print(f"{j.name}: {res['state'].upper()}" + (
                    "" if res["state"] == "success" else
                    f": {bounded(str(res.get('error')), 200)}"), flush=True)
                continue
            if res["state"] != "success" or text is None:
                from optuna.trial import TrialState
                trial.set_user_attr("error", bounded(str(res.get("error")), 300))
                self.study.tell(trial, state=TrialState.FAIL)
                print(f"{j.name}: FAILED: {bounded(str(res.get('error')), 200)}", flush=True)
                continue
            import json
            self.tell(trial, j, json.loads(text), ran=True)

    def run(self):
        """Trials until the budget is spent (or the space used up), then wait for the last."""
        while True:
            while self.budget.left(len(self.pending)) and not self.budget.exhausted() and \
                    len(self.pending) < self.ctx["slots"] and self.launch():
                pass
            if not self.pending:
                if not self.budget.left(0) or self.repeats >= MAX_REPEATS or \
                        self.budget.exhausted():
                    return
                continue
            self.answer()
            self.collect()

    def cancel(self):
        """Stop the running trials: failed in the study and queued to run first next time."""
        from optuna.trial import TrialState
        cluster.cancel(self.ray, self.pending, 0)
        trials = [t for t, _ in self.pending.values() if t is not None]
        for trial in trials:
            self.study.tell(trial, state=TrialState.FAIL)
            self.study.enqueue_trial(trial.params, skip_if_exists=False)
        return (f"{len(trials)} trial(s) stopped and queued again, "
                f"{len(self.pending) - len(trials)} confirmation run(s) stopped: their finished "
                f"epochs are kept on their machines, and the same command resumes them")


def max_epochs(grid):
    """The most epochs a trial runs (Hyperband's largest resource)."""
    dim = grid["search"]["space"].get("train.epochs")
    if dim is not None:
        return max(dim[1]) if dim[0] == "values" else int(dim[2])
    some = {k: d[1][0] if d[0] == "values" else d[1] for k, d in grid["search"]["space"].items()}
    return job(grid, some, 0, True).params["train"]["epochs"]


def context(ray, grid, remote, dvc_remote, cpus, workdir):
    env = {k: os.environ[k] for k in ("DATA_MIRROR",) if k in os.environ}
    mailbox = ray.remote(Mailbox).options(num_cpus=0).remote()
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
    return {"commit": check_commit(remote), "remote": remote, "dvc_remote": dvc_remote,
            "cpus": cpus, "env": env, "workdir": workdir, "mailbox": mailbox, "slots": slots}


def main(grid, seeds=None, address=None, cpus_per_run=1, remote=None, dvc_remote=None,
         parallel=None):
    """Search, then confirm the best settings; returns the study."""
    import ray

    from ablation.search.confirm import confirm
    remote = remote or os.getcwd()
    path = journal_path(grid)
    threads = grid["rows"][0]["params"]["train"]["threads"] if grid["rows"] else None
    cpus = threads if isinstance(threads, int) else cpus_per_run
    with OutputLock(path):
        ray.init(address=address, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, configure_logging=False)
        catch_interrupts()
        workdir = tempfile.mkdtemp(prefix="ablation-search-")
        try:
            ctx = context(ray, grid, remote, dvc_remote, cpus, workdir)
            ctx["slots"] = min(ctx["slots"], parallel or ctx["slots"])
            study = make_study(grid, path, max_epochs(grid))
            recover(study)
            budget = Budget(grid, study, settings(grid["search"]["space"]))
            s = Search(ray, grid, study, budget, ctx)
            try:
                s.run()
                print(budget.summary(), flush=True)
                return confirm(ray, s, seeds or grid["search"]["seeds"])
            except KeyboardInterrupt as e:
                e.note = s.cancel()
                raise
        finally:
            ray.shutdown()
            shutil.rmtree(workdir, ignore_errors=True)


def check_ready(grid):
    """A grid that can be searched here: a search: section, and Optuna installed."""
    if not grid.get("search"):
        raise UserError(f"{grid['path']}: no 'search:' section (grid/space.py says what it holds)")
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("search needs optuna: pip install -e '.[train]'") from None
