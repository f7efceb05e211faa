"""How the GPU study shares one GPU among its runs: measure the ways, pick the fastest, run
the units longest first under a time budget (gpu/study.py drives it).

Packings (each keeps every run's result its own):
  solo       one run at a time in one worker process;
  processes  W worker processes side by side, each one run at a time (CUDA time-slices them);
  mps        the same under NVIDIA's MPS daemon (started here without root, its pipe and log
             folders in the work folder), which lets their kernels run together;
  fused      packs of runs of one architecture, batch size and epoch count trained as one
             computation (fused.py: grouped convolutions), W packs side by side.
`auto` measures aggregate images/s of solo, processes, mps (where its daemon exists) and fused
for ResNet-18 at batch 16 (the launch-bound case) in this same command, for a few seconds
each, and takes the fastest; every run's record says which packing ran it and how many runs
shared the GPU (ABLATION_PACKING, ABLATION_GPU_SHARED_BY).

Each job (a unit, or a fused pack) runs in a worker process: `python -m ablation.gpu.study
_job SPEC` calls the train stage's own train.main (or fused.train_pack) on the prepared data.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ablation.core.io import write_json
from ablation.record.archive import file_digest
from ablation.training import engine

PACKINGS = ("auto", "solo", "processes", "mps", "fused")
WORKERS = 4  # processes / mps / fused: jobs side by side on the GPU
PACK = 8  # fused: most runs in one pack
MEASURE_S = {"cuda": 4.0, "cpu": 1.0}  # seconds each candidate trains when measured
TRAIN_IMAGES = 60000
TEST_IMAGES = 10000
EVAL_SPEEDUP = 3.0  # a forward pass over a test image costs about a third of a training step
SETUP_S = {"cuda": 15.0, "cpu": 5.0}  # process start, CUDA context, model build, outputs
GO_WAIT_S = 120  # a measuring worker waits this long for the others, then gives up
MPS_TIMEOUT_S = 30  # starting or stopping the MPS daemon


def job_main(spec_path):
    """A worker process: train the units of one job (or measure a candidate) as SPEC says."""
    with open(spec_path) as f:
        spec = json.load(f)
    if spec["kind"] == "measure":
        return measure(spec)
    if spec["kind"] == "fused":
        from ablation.gpu.fused import train_pack
        results = train_pack([j["args"] for j in spec["units"]], progress=False)
        for j, (_, history) in zip(spec["units"], results):
            write_curves(j["args"]["live_dir"], history)
    else:
        from ablation.stages.train import main as train
        for j in spec["units"]:
            train(**j["args"], progress=False)
    for j in spec["units"]:
        write_json({**j["unit_info"], "start": spec["start"], "end": time.time(),
                    "weights_sha256": file_digest(j["args"]["model_path"])}, j["unit_file"])


def write_curves(live_dir, history):
    """The per-epoch curves a fused run made, in the train stage's dvclive layout."""
    from ablation.training.live import TsvLive, log_epoch
    live = TsvLive(live_dir)
    for h in history:
        log_epoch(live, h)


def measure(spec):
    """Train `k` fresh ResNets (fused: as one pack) on random images resident on the device
    for MEASURE_S seconds after a warm-up, starting when the `go` file appears; write the
    images/s."""
    from ablation.gpu import fused
    from ablation.training.params import load as load_params
    device = torch.device(spec["device"])
    cfg = {**load_params(["train"])["train"], "device": spec["device"], "batch_size":
           spec["batch"], "small_maps": False, "loader": "resident"}
    sw = engine.resolve_switches(cfg, device)
    k, b = spec["k"], spec["batch"]
    nets = [engine.setup_model(spec["model"], {**cfg, "seed": i}, device, sw) for i in range(k)]
    ctx = engine.RunContext(device, 0.13, 0.31, sw["channels_last"])
    x = torch.randint(0, 256, (k, b, 28, 28), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (k, b), device=device)
    if spec["fused"]:
        mean = torch.full((k,), ctx.mean, device=device)
        std = torch.full((k,), ctx.std, device=device)

        def one():
            fused.step([n[0] for n in nets], [n[2] for n in nets],
                       fused.inputs(list(x), mean, std, ctx.channels_last), y)
    else:  # the train loop's step (engine.train_one_epoch), no sync: timed like the fused one
        def one():
            for (_, m, opt, _), xb, yb in zip(nets, x, y):
                loss = F.cross_entropy(m(engine.normalise(xb, ctx)), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    for _ in range(3):  # allocator, cuDNN's algorithm choice
        one()
    open(spec["ready"], "w").close()
    t0 = time.monotonic()
    while not os.path.exists(spec["go"]):  # the parent says go (or is gone)
        if time.monotonic() - t0 > GO_WAIT_S:
            raise SystemExit(f"measure: no go after {GO_WAIT_S} s")
        time.sleep(0.01)
    engine.sync(device)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < spec["seconds"]:
        one()
        steps += 1
        if steps % 10 == 0:
            engine.sync(device)
    engine.sync(device)
    write_json({"images_per_s": steps * k * b / (time.perf_counter() - t0)}, spec["result"])


class Launcher:
    """Runs the study's units in worker processes; `finished(unit, params, status)` is called
    as each ends, so the archive is always up to date."""

    def __init__(self, work, data, dry_run, deadline, finished, test_images=TEST_IMAGES):
        self.work, self.data, self.dry_run, self.deadline = work, data, dry_run, deadline
        self.finished, self.test_images = finished, test_images
        self.device = "cpu" if dry_run else "cuda"
        # a rehearsal on a small CPU measures the same ways at a size it can afford
        self.workers, self.pack = (2, 2) if dry_run else (WORKERS, PACK)
        self.ratios = []
        self.mps_env = None
        self.choice = None

    # ---- measuring the packings ---------------------------------------------------------------

    def spawn(self, spec, env=None, at_once=1):
        """A worker process for `spec` (written beside the work folder's jobs), with its share
        of the cores when `at_once` run side by side (more busy threads than cores spin
        against each other)."""
        os.makedirs(os.path.join(self.work, "jobs"), exist_ok=True)
        path = os.path.join(self.work, "jobs", f"{spec['id']}.json")
        write_json(spec, path)
        log = open(os.path.join(self.work, "jobs", f"{spec['id']}.log"), "w")
        env = {**os.environ, **(self.mps_env or {}), **(env or {}),
               "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // at_once))}
        from ablation.core.process import die_with_parent  # never outlives the launcher
        return subprocess.Popen([sys.executable, "-m", "ablation.gpu.study", "_job", path],
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=die_with_parent)

    def measure_one(self, name, procs, k, fused, model="resnet18", batch=16):
        """Aggregate images/s of `procs` processes each training `k` runs (fused or one after
        another) at once, or None where it failed."""
        d = os.path.join(self.work, "measure", name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        go = os.path.join(d, "go")
        specs = [{"id": f"measure-{name}-{i}", "kind": "measure", "device": self.device,
                  "model": model, "batch": batch, "k": k, "fused": fused, "go": go,
                  "seconds": MEASURE_S[self.device], "ready": os.path.join(d, f"ready{i}"),
                  "result": os.path.join(d, f"result{i}.json")} for i in range(procs)]
        ps = [self.spawn(s, at_once=procs) for s in specs]
        t0 = time.monotonic()
        while not all(os.path.exists(s["ready"]) for s in specs):
            if any(p.poll() not in (None, 0) for p in ps) or time.monotonic() - t0 > 90:
                break
            time.sleep(0.05)
        open(go, "w").close()
        rc = []
        for p in ps:
            try:
                rc.append(p.wait(timeout=MEASURE_S[self.device] + GO_WAIT_S))
            except subprocess.TimeoutExpired:  # e.g. an MPS client stuck at CUDA start
                kill(p)
                rc.append("timeout")
        if any(rc) or not all(os.path.exists(s["result"]) for s in specs):
            log = os.path.join(self.work, "jobs", f"{specs[0]['id']}.log")
            print(f"  {name}: failed (exit {rc}): {tail(log, 300)!r}", flush=True)
            return None
        return sum(json.load(open(s["result"]))["images_per_s"] for s in specs)

    def start_mps(self):
        """NVIDIA's MPS control daemon, as this user, pipes and logs in the work folder;
        None where it is not installed or does not start."""
        exe = shutil.which("nvidia-cuda-mps-control")
        if self.device != "cuda" or exe is None:
            return None
        env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.abspath(os.path.join(self.work, "mps-pipe")),
               "CUDA_MPS_LOG_DIRECTORY": os.path.abspath(os.path.join(self.work, "mps-log"))}
        for v in env.values():
            os.makedirs(v, exist_ok=True)
        try:  # it daemonizes: no pipes for it to keep open
            r = subprocess.run([exe, "-d"], env={**os.environ, **env}, timeout=MPS_TIMEOUT_S,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (subprocess.TimeoutExpired, OSError):
            return None
        return env if r.returncode == 0 else None

    def stop_mps(self):
        if self.mps_env:
            try:  # quit waits for its clients: bounded
                subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n",
                               env={**os.environ, **self.mps_env}, capture_output=True,
                               timeout=MPS_TIMEOUT_S)
            except (subprocess.TimeoutExpired, OSError):
                print("gpu_study: the MPS daemon did not quit in time", flush=True)
            self.mps_env = None

    def choose(self, todo, packing, workers):
        """Measure the candidates (all of them for `auto`), pick one; returns what to record."""
        w = workers or self.workers
        cands = {"solo": (1, 1, False), "processes": (w, 1, False), "mps": (w, 1, False),
                 "fused": (w, self.pack, True)}
        wanted = list(cands) if packing == "auto" else ["solo", packing]
        measured = {}
        print(f"gpu_study: measuring how runs share the {self.device} (ResNet-18, batch 16, "
              f"{MEASURE_S[self.device]:.0f} s each)", flush=True)
        for name in dict.fromkeys(wanted):
            procs, k, fused = cands[name]
            if name == "mps":
                self.mps_env = self.start_mps()
                if self.mps_env is None:
                    print("  mps: not available here (no nvidia-cuda-mps-control or no GPU)")
                    continue
            ips = self.measure_one(name, procs, k, fused)
            if name == "mps":
                self.stop_mps()
            if ips and (name == "solo" or "solo" in measured):
                measured[name] = {"workers": procs, "runs_per_worker": k, "images_per_s": ips}
                print(f"  {name:9s} {procs} process(es) x {k} run(s): {ips:,.0f} images/s "
                      f"({ips / measured['solo']['images_per_s']:.2f}x solo)", flush=True)
        if "solo" not in measured:
            raise RuntimeError("gpu_study: even one run alone failed to train (see the logs "
                               "under the work folder's measure/)")
        pick = packing if packing != "auto" else max(
            measured, key=lambda n: measured[n]["images_per_s"])
        pick = pick if pick in measured else "solo"
        self.choice = {"mode": pick, "workers": 1 if pick == "solo" else w,
                       "pack_size": self.pack if pick == "fused" else 1, "candidates": measured,
                       "solo_images_per_s": measured["solo"]["images_per_s"],
                       "gain": measured[pick]["images_per_s"] / measured["solo"]["images_per_s"]}
        print(f"gpu_study: packing {pick} ({self.choice['workers']} at once)", flush=True)
        return self.choice

    # ---- running the units ----------------------------------------------------------------------

    def jobs(self, todo):
        """[(job: [(unit, params)], forecast s)], longest first; fused packs where chosen."""
        if self.choice["mode"] == "fused":
            from ablation.gpu.fused import VARY
            groups = {}
            for u, p in todo:  # a pack shares everything a fused computation must share
                key = (u.model, json.dumps({k: v for k, v in p["train"].items()
                                            if k not in VARY}, sort_keys=True))
                groups.setdefault(key, []).append((u, p))
            n = self.choice["pack_size"]
            jobs = [g[i:i + n] for g in groups.values() for i in range(0, len(g), n)]
        else:
            jobs = [[x] for x in todo]
        return sorted(((j, self.forecast(j)) for j in jobs), key=lambda jf: -jf[1])  # raw

    def forecast(self, job):
        """Seconds `job` should take, uncorrected: one run's images at the rate each run
        progressed while the chosen packing was measured (ResNet-18 batch 16: aggregate /
        (workers x runs per worker); the runs of a pack progress together, a smaller pack no
        faster, as a launch-bound step costs the same), scaled to its model and batch size
        (launch-bound: a cost per layer per step)."""
        u, p = job[0]
        t = p["train"]
        limit = p["data"]["train_limit"] or TRAIN_IMAGES
        m = self.choice["candidates"][self.choice["mode"]]
        rate = m["images_per_s"] / (m["workers"] * m["runs_per_worker"])
        rate *= t["batch_size"] / 16 * LAYERS["resnet18"] / LAYERS[u.model]
        runs = 1 if self.choice["mode"] == "fused" else len(job)
        return SETUP_S[self.device] + runs * t["epochs"] * (
            limit + self.test_images / EVAL_SPEEDUP) / rate

    def correction(self):
        """Median of actual / forecast over the jobs finished so far (1 before any)."""
        import statistics
        return statistics.median(self.ratios) if self.ratios else 1.0

    def job_spec(self, jid, job):
        units = []
        for u, p in job:
            base = os.path.join(self.work, "runs", u.name)
            stem = os.path.join(base, u.metrics.removesuffix(".json"))
            units.append({"unit_info": {"key": u.format()}, "unit_file": f"{stem}.unit.json",
                          "args": {"cfg": p["train"], "data_cfg": p["data"],
                                   "data_path": self.data[u.dataset], "model_name": u.model,
                                   "metrics_path": os.path.join(base, u.metrics),
                                   "model_path": os.path.join(self.work, "models", u.name,
                                                              u.dataset, f"{u.model}.pt"),
                                   "ckpt_path": None, "live_dir": stem}})
        return {"id": jid, "kind": "fused" if self.choice["mode"] == "fused" else "units",
                "start": time.time(), "units": units}

    def run(self, todo):
        """Start jobs longest first while slots are free and their forecast fits before the
        deadline; collect each as it ends; stop what still runs at the deadline."""
        c = self.choice
        if c["mode"] == "mps":
            self.mps_env = self.start_mps()
        queue, running, n = self.jobs(todo), {}, 0
        shared = c["workers"] * c["pack_size"]
        env = {"ABLATION_PACKING": c["mode"], "ABLATION_GPU_SHARED_BY": str(shared)}
        try:
            while queue or running:
                left = None if self.deadline is None else self.deadline - time.monotonic()
                while queue and len(running) < c["workers"]:
                    k = self.correction()  # what finished jobs took against their forecast
                    fits = [i for i, (_, f) in enumerate(queue) if left is None or f * k <= left]
                    if not fits:
                        break
                    job, f = queue.pop(fits[0])
                    n += 1
                    spec = self.job_spec(f"job{n}", job)
                    running[self.spawn(spec, env, c["workers"])] = (job, f, time.monotonic(),
                                                                   spec["id"])
                if not running:  # nothing fits the time left
                    for job, f in queue:
                        self.report(job, {"status": "skipped", "forecast_s": f,
                                          "why": "forecast exceeds the time left"})
                    break
                self.collect(running, left)
                time.sleep(0.2)
        finally:  # also on SIGTERM (gpu_study.main turns it into SystemExit)
            for p in running:
                kill(p)
            self.stop_mps()

    def collect(self, running, left):
        """Report every job that ended; at the deadline, stop the rest as cut."""
        for p in list(running):
            job, f, t0, jid = running[p]
            rc = p.poll()
            cut = rc is None and left is not None and left <= 0
            if rc is None and not cut:
                continue
            if cut:
                kill(p)
            del running[p]
            wall = time.monotonic() - t0
            if rc == 0:
                self.ratios.append(wall / f)
            log = os.path.join(self.work, "jobs", f"{jid}.log")
            status = {"status": "done" if rc == 0 else "cut" if cut else "failed",
                      "wall_s": wall, "forecast_s": f, "packing": self.choice["mode"],
                      "job": jid, "runs_in_job": len(job), "start": time.time() - wall,
                      "end": time.time()}
            if rc:
                status["exit"] = rc
                status["log_tail"] = tail(log)
            self.report(job, status)

    def report(self, job, status):
        for u, p in job:
            self.finished(u, p, status)
        print(f"  {status['status']}: {', '.join(u.format() for u, _ in job)} "
              f"({status.get('wall_s', 0):.0f} s, forecast {status['forecast_s']:.0f} s)"
              + (f": {status['log_tail'][-200:]}" if status.get("log_tail") else ""),
              flush=True)


def kill(p):
    """SIGKILL a worker's process group and reap it; gone already is fine."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()


def tail(path, n=2000):
    try:
        with open(path, errors="replace") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read()
    except OSError:
        return ""


LAYERS = {"resnet18": 21, "resnet34": 37, "resnet50": 54}  # convolutions + fc: launches/step
