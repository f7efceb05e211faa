"""`python -m ablation.bench.search`: one question asked of the full grid and of the search, side
by side, in a scratch clone of this repository.

    python -m ablation.bench.search [--reps 3] [--pruners median,hyperband] [--trials 10]
                                    [--train-limit 1500] [--epochs 4] [--out bench/out/search.json]

The question: grids/search.yaml's (ResNet-18 on Fashion-MNIST over optimizer x lr x batch
size, 16 settings), shrunk further to `--train-limit` training images, 1,000 test images and
`--epochs` epochs, one thread a run, two runs at a time. First the full grid at seed 0 (`grid
run`), then for each pruner `--reps` searches (`grid search`, TPE, `--trials` trials, sampler
seeds 1..reps: each pruner sees the same sampler seeds; each search its own grid name so none
reuses another's trials). For each search: the images its trials trained against the grid's,
the images of its confirmation, its confirmed best, and whether that best is within noise of
the grid's best: the grid's best setting is run at the confirmation's seeds too (where the
search did not confirm it), and the two are compared with Welch's test and TOST within the
margin. Prints the figures and, per pruner, their median over the searches; writes --out.
"""
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile

import yaml

from ablation.core.cli import Parser, UserError, run
from ablation.core.io import write_json
from ablation.record.run import RunId
from ablation.report.stats import contrast, p_difference, p_equivalence, summarize

PATH = "metrics/resnet/fashion_mnist/resnet18.json"


def sh(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"{' '.join(cmd[:4])}: {(r.stdout + r.stderr).strip()[-600:]}")
    return r.stdout


def grid_text(name, train_limit, epochs, sampler_seed, trials, top, seeds, pruner="median"):
    with open("grids/search.yaml") as f:
        g = yaml.safe_load(f)
    g["name"] = name
    g["set"].update({"data.train_limit": train_limit, "data.test_limit": 1000,
                     "train.epochs": epochs, "train.threads": 1})
    g["search"].update(sampler_seed=sampler_seed, trials=trials, top=top, seeds=seeds,
                       pruner=pruner)
    return yaml.safe_dump(g, sort_keys=False)


def experiments(repo):
    from ablation.record.dvc import experiments as exps
    with contextlib.chdir(repo):
        return exps()


def accuracy(run):
    return (run.values(PATH) or {}).get("test_accuracy")


def images(run):
    v = run.values(PATH) or {}
    return (v.get("train_images") or 0) * (v.get("epochs_completed") or 0)


def setting_of(run):
    t = (run.params or {}).get("train") or {}
    return (t.get("optimizer"), t.get("lr"), t.get("batch_size"))


def judge(runs, name, grid_best, grid_vals, margin):
    """One search's figures from the record: its trials' images, its confirmed best, and that
    best against the grid's best setting at the same seeds (`grid_vals`)."""
    ours = {n: r for n, r in runs.items() if n.startswith(name + "-") and r.finished}
    trials = [r for r in ours.values() if r.params["train"].get("trial")]
    conf = {}
    for r in ours.values():
        if not r.params["train"].get("trial") and accuracy(r) is not None:
            conf.setdefault(setting_of(r), []).append(accuracy(r))
    best = max(conf, key=lambda s: statistics.mean(conf[s]))
    c = contrast([(conf[best], grid_vals)]) if best != grid_best else None
    return {"trials": len(trials),
            "pruned": sum(bool(r.values(PATH).get("pruned")) for r in trials),
            "trial_images": sum(images(r) for r in trials),
            "confirm_images": sum(images(r) for r in ours.values()) -
            sum(images(r) for r in trials),
            "best": best, "best_mean": summarize(conf[best]).mean,
            "grid_best_mean": summarize(grid_vals).mean,
            "p_difference": p_difference(c) if c else 1.0,
            "p_equivalence": p_equivalence(c, margin) if c else 0.0}


def main(reps, train_limit, epochs, out, pruners=("median", "hyperband"), trials=10, top=2,
         seeds=3):
    src = os.getcwd()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep +
               os.environ.get("PATH", ""))
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        repo = os.path.join(tmp, "repo")
        sh(["git", "clone", "-q", src, repo], tmp, env)
        searches = [(f"b{p[:3]}{k}", p, k) for p in pruners for k in range(1, reps + 1)]
        for name, pruner, k in [("bgrid", "none", 0)] + searches:
            with open(os.path.join(repo, "grids", f"{name}.yaml"), "w") as f:
                f.write(grid_text(name, train_limit, epochs, k, trials, top, seeds, pruner))
        sh(["git", "add", "grids"], repo, env)
        sh(["git", "-c", "user.name=bench", "-c", "user.email=b@b", "commit", "-qm", "bench"],
           repo, env)
        grid = [sys.executable, "-m", "ablation.grid"]
        sh(grid + ["run", "grids/bgrid.yaml", "--seeds", "1", "--quiet"], repo, env)
        runs = experiments(repo)
        full = {n: r for n, r in runs.items() if n.startswith("bgrid-") and r.finished}
        best_run = max(full.values(), key=lambda r: accuracy(r) or -1)
        grid_best = setting_of(best_run)
        results = []
        for name, pruner, _ in searches:
            sh(grid + ["search", f"grids/{name}.yaml", "--parallel", "2"], repo, env)
            runs = experiments(repo)
            confirmed = {setting_of(r) for n, r in runs.items() if n.startswith(name + "-")
                         and not r.params["train"].get("trial")}
            if grid_best not in confirmed:  # the grid's best at the confirmation's seeds
                row = next(n for n, r in full.items() if setting_of(r) == grid_best)
                sh(grid + ["run", "grids/bgrid.yaml", "--seeds", str(seeds + 1), "--rows",
                           RunId.parse(row).row, "--quiet"], repo, env)
                runs = experiments(repo)
            grid_vals = [accuracy(r) for n, r in runs.items() if r.finished and
                         setting_of(r) == grid_best and r.params["train"]["seed"] > 0 and
                         not r.params["train"].get("trial") and
                         (n.startswith(name + "-") if grid_best in confirmed
                          else n.startswith("bgrid-"))]
            results.append({"pruner": pruner, **judge(runs, name, grid_best, grid_vals, 1.0)})
    return report(full, grid_best, accuracy(best_run), results, out)


def report(full, grid_best, grid_best_acc, results, out):
    grid_images = sum(images(r) for r in full.values())
    doc = {"grid": {"runs": len(full), "images": grid_images, "best": grid_best,
                    "best_accuracy_seed0": grid_best_acc}, "searches": results, "pruners": {}}
    for r in results:
        share = r["trial_images"] / grid_images
        print(f"{r['pruner']:9} {r['trials']} trials ({r['pruned']} pruned), "
              f"{r['trial_images']:,} images ({share:.0%} of the grid's {grid_images:,}; "
              f"+{r['confirm_images']:,} to confirm); best {r['best']} "
              f"{r['best_mean']:.2f} against the grid's best {grid_best} "
              f"{r['grid_best_mean']:.2f}: p {r['p_difference']:.3g} (difference), "
              f"{r['p_equivalence']:.3g} (equivalence within 1 point)")
    for pruner in dict.fromkeys(r["pruner"] for r in results):
        mine = [r for r in results if r["pruner"] == pruner]
        med = statistics.median(r["trial_images"] / grid_images for r in mine)
        total = statistics.median((r["trial_images"] + r["confirm_images"]) / grid_images
                                  for r in mine)
        found = sum(r["best"] == grid_best for r in mine)
        within = sum(r["p_difference"] >= 0.05 for r in mine)
        equivalent = sum(r["best"] == grid_best or r["p_equivalence"] < 0.05 for r in mine)
        print(f"{pruner}: median over {len(mine)} searches {med:.0%} of the grid's images "
              f"({total:.0%} with the confirmation); the grid's best found by {found}, "
              f"not shown different by {within}, shown equivalent (or the same) by {equivalent}")
        doc["pruners"][pruner] = {"median_share": med, "median_share_with_confirmation": total,
                                  "found_grid_best": found, "not_different": within,
                                  "equivalent": equivalent, "searches": len(mine)}
    write_json(doc, out)
    print(f"wrote {out}")
    return doc


def _cli(argv):
    ap = Parser(prog="python -m ablation.bench.search",
                description="The full grid and the search on one shrunk question, side by side")
    ap.add_argument("--reps", type=int, default=3, help="searches (default: %(default)s)")
    ap.add_argument("--pruners", default="median,hyperband",
                    help="comma-separated: median, hyperband, none (default: %(default)s)")
    ap.add_argument("--trials", type=int, default=10, help="trials a search")
    ap.add_argument("--train-limit", type=int, default=1500, help="training images")
    ap.add_argument("--epochs", type=int, default=4, help="epochs a run")
    ap.add_argument("--out", default="bench/out/search.json", help="where the figures go")
    a = ap.parse_args(argv)
    pruners = a.pruners.split(",")
    if not pruners or any(p not in ("median", "hyperband", "none") for p in pruners):
        raise UserError(f"--pruners {a.pruners!r}: allowed median, hyperband, none")
    main(a.reps, a.train_limit, a.epochs, a.out, pruners, a.trials)


if __name__ == "__main__":
    run(_cli)
