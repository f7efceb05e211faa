"""A kept model's card, reports/models/<name>.md: what the model is good for, written from the
record and never by hand (`python -m ablation.models card`; tests/test_models.py checks the
committed cards are what this writes).

Read from git-tracked files only, so any clone writes the same card: the run's metrics and
record (metrics/...json, .run.json: the normalisation too), its confusion matrix (dvclive's,
every test prediction), params.yaml, dvc.lock (the weights' DVC hash) and git's history (the
commit that first recorded that hash: regenerate the cards after committing a retrain), the
committed report records (reports/<grid>.json: every seed run of the same setting, for the
interval) with their grid files (the study's figure for that setting), and the dataset and
model registries.
"""
import json
import os
import subprocess

from ablation.core.cli import read_config
from ablation.core.io import replace_atomic
from ablation.grid.schema import load as load_grid
from ablation.models.registry import Kept, kept
from ablation.record import store
from ablation.record.run import LOAD_LIMIT, busy
from ablation.report.stats import one_run, p_difference, summarize
from ablation.stages.export import OPSET
from ablation.training import datasets, models
from ablation.training.params import PARAMS_FILE
from ablation.training.params import load as load_params

CARDS = os.path.join("reports", "models")
ACC = "test_accuracy"
# the params that decide what a run learns (its seed aside): runs equal in these are seeds of
# one setting, whatever machine, thread count or loader ran them
SAME = {"train": ("stem", "batch_size", "optimizer", "momentum", "lr", "weight_decay", "epochs",
                  "precision"),
        "svm": ("train_samples", "C", "gamma", "degree")}
STUDY_COLUMN = "test acc %"


def card_path(name):
    return os.path.join(CARDS, f"{name}.md")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def lock_hash(model):
    """The DVC hash dvc.lock records for the model's weights (the train stage's .pt for a
    ResNet, its export folder beside it) and the commit that first recorded it."""
    doc = read_config("dvc.lock") if os.path.exists("dvc.lock") else {}
    lock = (doc or {}).get("stages") or {}
    out = {}
    for stage in model.stages:
        for o in lock.get(stage, {}).get("outs", []):
            if o["path"].startswith("models/"):
                out[o["path"]] = o.get("md5")
    first = {}
    for path, md5 in out.items():
        r = subprocess.run(["git", "log", "--reverse", "--format=%H", f"-S{md5}", "--",
                            "dvc.lock"], capture_output=True, text=True)
        commits = r.stdout.split()
        first[path] = commits[0] if r.returncode == 0 and commits else None
    return out, first


def same_setting(model, params, run_params):
    """Whether a recorded run trained this kept model's setting (any seed)."""
    p = run_params or {}
    sec = "train" if model.stage == "train" else "svm"
    units = (p.get(sec) or {}).get("models" if sec == "train" else "kernels") or []
    data = p.get("data") or {}
    if model.dataset not in (data.get("datasets") or []) or model.unit not in units:
        return False
    if any(data.get(k) != params["data"].get(k) for k in ("train_limit", "test_limit")
           if sec == "train" or k == "test_limit"):
        return False
    return all((p.get(sec) or {}).get(k) == params[sec].get(k) for k in SAME[sec])


def seeds_on_record(model, params):
    """[(grid, run name, seed, accuracy, machine, study figure or None)] of every committed
    report's runs of this setting."""
    out = []
    for f in sorted(os.listdir("reports")):
        grid_file = os.path.join("grids", f.removesuffix(".json") + ".yaml")
        if not f.endswith(".json") or not os.path.exists(grid_file):
            continue
        g = load_grid(grid_file)
        if model.stage not in g.get("targets", ()):  # its runs carry the base's other files
            continue
        rows = {r["id"]: r for r in g["rows"]}
        for name, run in sorted(store.load(os.path.join("reports", f)).items()):
            if not same_setting(model, params, run.params):
                continue
            acc = run.metric(model.metrics, ACC)
            if acc is None:
                continue
            rid = run.id
            row = rows.get(rid.row) if rid else None
            seed = (run.params.get("train" if model.stage == "train" else "svm") or {}).get("seed")
            out.append((g["name"], name, seed, acc, run.metric(model.metrics, "device_name"),
                        ((row or {}).get("study") or {}).get(STUDY_COLUMN)))
    return out


def confusion(cm_path, k):
    """The k x k confusion matrix (rows actual, columns predicted) from dvclive's file, which
    lists every test image's actual and predicted class; None where it is absent or empty."""
    if not os.path.exists(cm_path):
        return None
    m = [[0] * k for _ in range(k)]
    for p in read_json(cm_path):
        a, b = str(p.get("actual")), str(p.get("predicted"))
        if a.isdigit() and b.isdigit() and int(a) < k and int(b) < k:
            m[int(a)][int(b)] += 1
    return m if any(map(any, m)) else None


def confusion_section(m, names):
    head = "| actual \\ predicted | " + " | ".join(str(i) for i in range(len(m))) + " | recall |"
    rows = [head, "|" + "---|" * (len(m) + 2)]
    for i, r in enumerate(m):
        rows.append(f"| {i} {names[i]} | " + " | ".join(f"{v:,}" for v in r)
                    + f" | {100.0 * r[i] / max(1, sum(r)):.1f} % |")
    return "\n".join(rows) + "\n"


def fmt_acc(s):
    if s.n == 0:
        return "none on record"
    if s.lo is None:
        return f"{s.mean:.2f} % (1 seed)"
    return f"{s.mean:.2f} % [{s.lo:.2f} – {s.hi:.2f}] ({s.n} seeds)"


def study_line(seeds):
    """Ours against the study's one run of the setting (report.stats.one_run)."""
    figures = sorted({s[5] for s in seeds if s[5] is not None})
    if not figures:
        return "the study has no figure for this setting"
    fig = figures[0]
    c = one_run([s[3] for s in seeds], fig)
    if c.se is None:
        return f"study {fig:.2f} %; ours {c.diff:+.2f} points (too few seeds to test)"
    p = p_difference(c)
    verdict = "beyond seed noise" if p < 0.05 else "within seed noise"
    return (f"study {fig:.2f} % (one run); ours {c.diff:+.2f} points, {verdict} (p {p:.2g}, "
            f"the study's run taken as one draw from our spread)")


def header(model, arch, rec):
    names = datasets.DATASETS[model.dataset]["classes"]
    shape = datasets.DATASETS[model.dataset]["shape"]
    what = f"{arch} on {model.dataset}" if model.stage == "train" else \
        f"SVM ({model.unit} kernel) on {model.dataset}"
    return (f"# {model.name}\n\n{what}: {len(names)} classes, input (1, {shape[0]}, "
            f"{shape[1]}) grey images. Written by `python -m ablation.models card` from the "
            f"record; do not edit.\n\n")


def data_section(model, params, rec):
    d = params["data"]
    lim = d.get("train_limit") if model.stage == "train" else params["svm"]["train_samples"]
    lines = [f"- data: {model.dataset}, {lim or 'all 60,000'} training images "
             f"({'a seeded subset' if lim else 'the whole split'}), scored on "
             f"{d.get('test_limit') or 'all 10,000'} test images"]
    if model.stage == "train":
        norm = f"mean {rec['data_mean']:.4f}, std {rec['data_std']:.4f}" \
            if rec.get("data_mean") is not None else "the training pixels' mean and std " \
            "(the artifact's model.json holds them)"
        lines.append(f"- preprocessing: uint8 pixels / 255, then (x − mean) / std with {norm}; "
                     f"float32 (N, 1, H, W)")
    else:
        lines.append("- preprocessing: uint8 pixels / 255, flattened to H·W features")
    return "\n".join(lines) + "\n"


def model_section(model, params):
    if model.stage == "svm":
        s = params["svm"]
        return (f"- model: scikit-learn SVC, kernel {model.unit}, C {s['C']}, gamma {s['gamma']}"
                f"{', degree ' + str(s['degree']) if model.unit == 'poly' else ''}; the .npz holds "
                f"support vectors, dual coefficients and intercepts (numpy arrays, no pickle)\n")
    t = params["train"]
    stem = models.STEMS[t["stem"]]
    return (f"- model: torchvision {model.unit}, first convolution 1 → 64 channels "
            f"{stem['kernel_size']}×{stem['kernel_size']} stride {stem['stride']} "
            f"({t['stem']} stem{', max-pool' if stem['maxpool'] else ', no max-pool'}), "
            f"10 outputs\n- training: {t['optimizer']} lr {t['lr']}"
            f"{' momentum ' + str(t['momentum']) if t['optimizer'] == 'sgd' else ''}, batch "
            f"{t['batch_size']}, {t['epochs']} epochs, weight decay {t['weight_decay']}, "
            f"{t['precision']}, seed {t['seed']}\n")


def accuracy_section(model, rec, seeds, cm):
    names = datasets.DATASETS[model.dataset]["classes"]
    s = summarize([x[3] for x in seeds])
    machines = sorted({x[4] or "machine not recorded" for x in seeds})
    grids = sorted({x[0] for x in seeds})
    lines = [f"- test accuracy of these weights: {rec[ACC]:.2f} %",
             f"- over the seeds of this setting on record ({', '.join(grids) or 'none'}): "
             f"{fmt_acc(s)}" + (f"; machines: {'; '.join(machines)}" if machines else ""),
             f"- against the study: {study_line(seeds)}"]
    if cm:
        recall = {i: 100.0 * r[i] / max(1, sum(r)) for i, r in enumerate(cm)}
        worst = sorted(recall.items(), key=lambda kv: kv[1])[:3]
        lines.append("- weakest classes (recall on the test set): " + ", ".join(
            f"{names[c]} {v:.1f} %" for c, v in worst))
    return "\n".join(lines) + "\n"


def cost_section(model, rec):
    t = rec.get("train_time_ms")
    ips = rec.get("images_per_s")
    load = rec.get("other_load_cores")
    return (f"- training: {t / 1000:,.0f} s" if t is not None else "- training: not recorded") \
        + (f", {ips:,.0f} images/s" if ips else "") + \
        f" on {rec.get('device_name')} ({rec.get('cpu_isa')}, {rec.get('threads')} threads" + \
        (f", other processes {load:.2f} cores" if load is not None else "") + ")" + \
        (f": the machine was busy past {LOAD_LIMIT} cores, not a clean timing" if busy(rec)
         else "") + "\n"


def provenance_section(model, hashes, first):
    lines = []
    for path, md5 in hashes.items():
        c = first.get(path)
        lines.append(f"- `{path}`: DVC md5 `{md5}`, recorded by commit "
                     f"{'`' + c[:12] + '`' if c else 'not committed yet'}")
    return "\n".join(lines) + "\n" if lines else "- weights: not in dvc.lock yet\n"


def render(model: Kept, params):
    rec = {**read_json(model.metrics)}
    run_json = model.metrics.removesuffix(".json") + ".run.json"
    if os.path.exists(run_json):
        rec.update(read_json(run_json))
    cm = os.path.join(model.metrics.removesuffix(".json"), "plots", "sklearn",
                      "confusion_matrix.json")
    names = datasets.DATASETS[model.dataset]["classes"]
    matrix = confusion(cm, len(names))
    seeds = seeds_on_record(model, params)
    hashes, first = lock_hash(model)
    loads = (f"safetensors (state dict) + ONNX (opset {OPSET}) + model.json, in "
             f"`{model.path}/` (the README's loaders)" if model.stage == "train" else
             f"`{model.path}` (np.load)")
    return (header(model, model.unit, rec)
            + "## Accuracy\n\n" + accuracy_section(model, rec, seeds, matrix)
            + ("\nThe train stage's confusion matrix on the test set:\n\n"
               + confusion_section(matrix, names) if matrix else "")
            + "\n## Data and model\n\n" + data_section(model, params, rec)
            + model_section(model, params) + f"- files: {loads}\n"
            + "\n## Cost\n\n" + cost_section(model, rec)
            + "\n## Known limits\n\n"
            + "- accuracy differs a little between CPUs (kernel paths and summation order); "
              "the interval above pools the machines listed\n"
            + "- the gap to the study, and the causes tested for it: docs/fidelity.md\n"
            + "\n## Provenance\n\n" + provenance_section(model, hashes, first))


def write_cards(names=None, check=False):
    """Write (or, with `check`, compare) the cards of `names` (every kept model by default);
    return the paths that differ from what is written (check) or were written."""
    params = load_params(["data", "train", "svm"], PARAMS_FILE)
    out = []
    for m in kept():
        if names and m.name not in names:
            continue
        text = render(m, params)
        path = card_path(m.name)
        old = open(path).read() if os.path.exists(path) else None
        if old == text:
            continue
        out.append(path)
        if not check:
            def write(tmp, text=text):
                with open(tmp, "w") as f:
                    f.write(text)
            replace_atomic(write, path)
    return out
