"""`python -m ablation.grid run GRID`: every run of a grid a Ray task, every run still a DVC
experiment.

Each task clones the git remote at the driver's commit into a directory of its own (never two
DVC processes in one repository), runs its row with `dvc exp run -n NAME -S ...`, and pushes
the experiment (`dvc exp push`: git refs to the git remote, outputs to the DVC remote). Ray
gives each task its CPUs (its train.threads; --cpus-per-run where that is `auto`) and GPUs
(CUDA_VISIBLE_DEVICES). With a fraction (--gpus-per-run 0.25) Ray packs runs on one GPU (each
sees the shared GPU's id), and each run records that it shared it (`packing`,
`gpu_shared_by`). A worker process that dies is retried by Ray; a stage that fails is a FAILED
run, not retried, with its error line kept for the report. The driver prints a line per run per
epoch with an ETA (not with --quiet) and pulls each finished experiment into its own
repository, so `dvc exp show` and `python -m ablation.report` see them all. Ctrl-C or SIGTERM
cancels the tasks, which stop their runs and remove their clones; started again, it runs only
what is missing, each interrupted run from its last finished epoch.
"""
import os
import shutil
import socket
import tempfile
import time

from ablation.core.cli import bounded, catch_interrupts
from ablation.grid.clone import (
    check_commit,
    clear_failure,
    cpus_of,
    record_failure,
    run_in_clone,
    spec_of,
)
from ablation.grid.queue import known_runs, to_run
from ablation.record.dvc import dvc

RETRIES = 3  # Ray re-runs a task whose worker process died (killed, node lost)


def runs_per_gpu(gpus):
    """How many runs Ray puts on one GPU: for a fraction, the whole tasks that fit in 1.0
    (0.25 -> 4, 0.3 -> 3, the 0.1 left over idle; exact for Ray's 4-decimal quantities); 1 for
    whole GPUs or none."""
    return int(1 / gpus) if 0 < gpus < 1 else 1


def packing_env(gpus):
    """What a run records about sharing its GPU (stages/train.py: packing, gpu_shared_by): set only
    where Ray packs several runs on one GPU; absent, a run records itself solo."""
    n = runs_per_gpu(gpus)
    return {"ABLATION_PACKING": "ray-fractional", "ABLATION_GPU_SHARED_BY": str(n)} if n > 1 \
        else {}


def run_one(spec, events=None):
    """One run in a fresh clone on whatever node Ray chose; returns what happened. `events`: a
    Ray queue for its epoch lines (None: quiet)."""
    import ray
    where = {"host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(),
             "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
    send = (lambda ev: events.put({"name": spec["name"], **ev})) if events is not None else None
    return run_in_clone(spec, where, {"ABLATION_RAY_NODE_ID": where["node"]}, send)


class Progress:
    """The driver's account of the grid: epoch lines as they come, runs as they end, an ETA
    from the epochs done so far."""

    def __init__(self, specs, quiet):
        self.total = sum(s["epochs"] for s in specs.values()) or 1
        self.epochs = {name: 0 for name in specs}  # epochs finished per run
        self.planned = {name: s["epochs"] for name, s in specs.items()}
        self.t0, self.quiet = time.time(), quiet

    def eta(self):
        done = sum(self.epochs.values())
        if not done:
            return "ETA after the first epoch"
        return f"ETA {(time.time() - self.t0) / done * (self.total - done) / 60:.1f} min"

    def epoch(self, ev):
        self.epochs[ev["name"]] = self.epochs.get(ev["name"], 0) + 1
        if not self.quiet:
            print(f"[{sum(self.epochs.values())}/{self.total} epochs, {self.eta()}] "
                  f"{ev['name']} {ev['stage'] or 'train'} epoch {ev['epoch']}/{ev['epochs']}: "
                  f"test {ev['accuracy']:.2f}%, {ev['images_per_s']} img/s", flush=True)

    def ended(self, name, res, n_done, n_total, pending):
        if res["state"] == "success":  # epochs restored or not streamed count as done
            self.epochs[name] = max(self.epochs.get(name, 0), self.planned.get(name, 0))
        failed = "" if res["state"] == "success" else f": {res['error']}"
        print(f"[{n_done}/{n_total} runs done, {pending} running or waiting, {self.eta()}] "
              f"{name}: {res['state'].upper()} on {res['host']} (GPUs {res['gpus'] or 'none'})"
              f"{failed}", flush=True)


def main(grid, seeds=None, force=False, address=None, gpus_per_run=None, cpus_per_run=1,
         remote=None, dvc_remote=None, quiet=False):
    """Run the grid's missing runs as Ray tasks; returns {name: result}. An interrupt (SIGINT,
    SIGTERM) cancels the tasks: each stops its run (the finished epochs kept in the machine's
    checkpoint store) and removes its clone; the same command resumes them."""
    import ray
    remote = remote or os.getcwd()
    commit = check_commit(remote)
    todo = to_run(grid, seeds, known_runs(grid), force)
    if not todo:
        print("nothing to run: every run of the grid already succeeded with its plan")
        return {}
    ray.init(address=address, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, configure_logging=False)
    catch_interrupts()  # ray.init's own SIGTERM handler would exit 1 with a stack dump
    workdir = tempfile.mkdtemp(prefix="ablation-grid-")  # every clone on this node goes here
    try:
        return _run(ray, todo, commit, remote, dvc_remote, gpus_per_run, cpus_per_run, quiet,
                    workdir)
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(ray, todo, commit, remote, dvc_remote, gpus_per_run, cpus_per_run, quiet, workdir):
    from ray.util.queue import Empty, Queue
    gpus = gpus_per_run if gpus_per_run is not None else \
        (1 if ray.cluster_resources().get("GPU", 0) > 0 else 0)
    share = runs_per_gpu(gpus)
    env = {k: os.environ[k] for k in ("DATA_MIRROR",) if k in os.environ} | packing_env(gpus)
    events = None if quiet else Queue(actor_options={"num_cpus": 0})
    specs, pending = {}, {}
    for job in todo:
        cpus = cpus_of(job, cpus_per_run)
        specs[job.name] = spec_of(job, commit, remote, dvc_remote, cpus, env, workdir)
        task = ray.remote(run_one).options(num_cpus=cpus, num_gpus=gpus, max_retries=RETRIES,
                                           retry_exceptions=False,
                                           scheduling_strategy="SPREAD")  # over every node
        pending[task.remote(specs[job.name], events)] = job.name
    cpus = sorted({s["cpus"] for s in specs.values()})
    print(f"started {len(pending)} run(s) on {ray.cluster_resources().get('CPU', 0):.0f} CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):.0f} GPUs; {'/'.join(map(str, cpus))} "
          f"CPU(s) (its train.threads) and {gpus:g} GPU(s) per run ("
          + (f"{share} runs share each GPU)" if share > 1 else "no GPU shared)"), flush=True)
    results, progress, total = {}, Progress(specs, quiet), len(pending)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            while events is not None:
                try:
                    progress.epoch(events.get_nowait())
                except Empty:
                    break
            if done:
                name = pending.pop(done[0])
                results[name] = finish(ray, done[0], name, remote)
                progress.ended(name, results[name], len(results), total, len(pending))
    except KeyboardInterrupt as e:
        e.note = cancel(ray, pending, len(results))
        raise
    return results


def finish(ray, ref, name, remote):
    """A task's result, its experiment pulled here (or its failure recorded)."""
    try:
        res = ray.get(ref)
    except Exception as e:  # retries exhausted: the worker kept dying
        res = {"name": name, "state": "failed", "host": None, "node": None, "gpus": None,
               "error": f"worker died {RETRIES + 1} times ({type(e).__name__})",
               "log": str(e)[-5000:]}
    if res["state"] == "success":
        clear_failure(name)
        if os.path.realpath(remote) != os.path.realpath(os.getcwd()):
            r = dvc(["exp", "pull", "-f", remote, name])
            if r.returncode != 0:
                print(f"warning: dvc exp pull {name}: {bounded(r.stderr.strip(), 200)}")
    else:
        record_failure(name, res)
    return res


CANCEL_WAIT_S = 60  # for cancelled tasks to stop their runs and remove their clones


def cancel(ray, pending, n_done):
    """Cancel every unfinished task and wait for them to clean up; returns what to tell."""
    for ref in pending:
        ray.cancel(ref, force=False)
    ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
    return (f"{n_done} run(s) finished, {len(pending)} cancelled: their finished epochs are "
            f"kept on their machines, and the same command resumes them")
