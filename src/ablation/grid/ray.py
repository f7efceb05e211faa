"""`python -m ablation.grid run GRID`: every run of a grid a Ray task, every run still a DVC
experiment.

Each task clones the git remote at the driver's commit into a directory of its own (never two
DVC processes in one repository), runs its row with `dvc exp run -n NAME -S ...`, and pushes
the experiment (`dvc exp push`: git refs to the git remote, outputs to the DVC remote). Ray
gives each task its CPUs and GPUs (CUDA_VISIBLE_DEVICES); threads follow --cpus-per-run. With a
fraction (--gpus-per-run 0.25) Ray packs runs on one GPU (each sees the shared GPU's id), and
each run records that it shared it (`packing`, `gpu_shared_by`). A
worker process that dies is retried by Ray; a stage that fails is a FAILED run, not retried,
with its error line kept for the report. The driver pulls each finished experiment into its
own repository, so `dvc exp show` and `python -m ablation.report` see them all; started again,
it runs only what is missing.
"""
import os
import socket
import time

from ablation.core.cli import bounded
from ablation.grid.clone import (
    check_commit,
    clear_failure,
    record_failure,
    run_in_clone,
    spec_of,
)
from ablation.grid.queue import to_run
from ablation.record.dvc import dvc, experiments

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


def run_one(spec):
    """One run in a fresh clone on whatever node Ray chose; returns what happened."""
    import ray
    where = {"host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(),
             "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
    return run_in_clone(spec, where, {"ABLATION_RAY_NODE_ID": where["node"]})


def main(grid, seeds=None, force=False, address=None, gpus_per_run=None, cpus_per_run=1,
         remote=None, dvc_remote=None):
    """Run the grid's missing runs as Ray tasks; returns {name: result}."""
    import ray
    remote = remote or os.getcwd()
    commit = check_commit(remote)
    todo = to_run(grid, seeds, experiments(), force)
    if not todo:
        print("nothing to run: every run of the grid already succeeded with its plan")
        return {}
    ray.init(address=address, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, configure_logging=False)
    gpus = gpus_per_run if gpus_per_run is not None else \
        (1 if ray.cluster_resources().get("GPU", 0) > 0 else 0)
    task = ray.remote(run_one).options(num_cpus=cpus_per_run, num_gpus=gpus,
                                       max_retries=RETRIES, retry_exceptions=False,
                                       scheduling_strategy="SPREAD")  # over every node
    share = runs_per_gpu(gpus)
    env = {k: os.environ[k] for k in ("DATA_MIRROR",) if k in os.environ} | packing_env(gpus)
    pending = {}
    for job in todo:
        pending[task.remote(spec_of(job, commit, remote, dvc_remote, cpus_per_run, env))] = \
            job.name
    print(f"started {len(pending)} run(s) on {ray.cluster_resources().get('CPU', 0):.0f} CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):.0f} GPUs; {cpus_per_run} CPU(s) and "
          f"{gpus:g} GPU(s) per run ("
          + (f"{share} runs share each GPU)" if share > 1 else "no GPU shared)"), flush=True)
    results, t0, total = {}, time.time(), len(pending)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(done[0])
        try:
            res = ray.get(done[0])
        except Exception as e:  # retries exhausted: the worker kept dying
            res = {"name": name, "state": "failed", "host": None, "node": None, "gpus": None,
                   "error": f"worker died {RETRIES + 1} times ({type(e).__name__})",
                   "log": str(e)[-5000:]}
        results[name] = res
        if res["state"] == "success":
            clear_failure(name)
            if os.path.realpath(remote) != os.path.realpath(os.getcwd()):
                r = dvc(["exp", "pull", "-f", remote, name])
                if r.returncode != 0:
                    print(f"warning: dvc exp pull {name}: {bounded(r.stderr.strip(), 200)}")
        else:
            record_failure(name, res)
        n_done = len(results)
        failed = sum(r["state"] != "success" for r in results.values())
        eta = (time.time() - t0) / n_done * (total - n_done)
        print(f"[{n_done}/{total} done, {len(pending)} running or waiting, {failed} failed, "
              f"ETA {eta / 60:.1f} min] {name}: {res['state'].upper()} on {res['host']} "
              f"(GPUs {res['gpus'] or 'none'})"
              + (f": {res['error']}" if res["state"] != "success" else ""), flush=True)
    ray.shutdown()
    return results
