"""The per-epoch curves and the confusion matrix a train run leaves for DVC: dvclive's Live
where dvclive is installed, else TsvLive writing the same files (the bare GPU machine)."""
import json
import os

from ablation.core.io import write_json


def open_live(live_dir, history):
    """A dvclive logger replaying what a checkpoint already holds, or None. Without dvclive
    (the bare GPU machine) the same files come from TsvLive."""
    if not live_dir:
        return None
    try:
        from dvclive import Live
    except ImportError:
        live = TsvLive(live_dir)
    else:
        live = Live(live_dir, save_dvc_exp=False, dvcyaml=None, report=None)
    for h in history:
        log_epoch(live, h)
    return live


class TsvLive:
    """The files dvclive's Live writes for the train stage, where dvclive is not installed (the
    bare GPU machine): per-step metrics as plots/metrics/<name>.tsv (header `step<TAB>name`,
    one row per step, floats as str() writes them, as csv does for dvclive) and the confusion
    matrix as plots/sklearn/<name> ([{actual, predicted}], 4-space JSON). Like Live without
    resume, it starts from an empty plots/ folder."""

    def __init__(self, live_dir):
        import shutil
        self.dir = os.fspath(live_dir)
        shutil.rmtree(os.path.join(self.dir, "plots"), ignore_errors=True)
        self.step = 0

    def log_metric(self, name, val):
        import math
        if not isinstance(val, str) and (math.isnan(val) or math.isinf(val)):
            val = str(val)
        path = os.path.join(self.dir, "plots", "metrics", f"{name}.tsv")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        new = not os.path.exists(path)
        with open(path, "a", encoding="utf-8", newline="") as f:
            if new:
                f.write(f"step\t{os.path.basename(name)}{os.linesep}")
            f.write(f"{self.step}\t{val}{os.linesep}")

    def next_step(self):
        self.step += 1

    def log_sklearn_plot(self, kind, labels, predictions, name):
        assert kind == "confusion_matrix", kind  # the only plot the train stage draws
        path = os.path.join(self.dir, "plots", "sklearn", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump([{"actual": str(a), "predicted": str(p)}
                       for a, p in zip(labels, predictions)], f, indent=4)
            f.write("\n")

    def end(self):
        pass


def log_epoch(live, h):
    live.log_metric("train/loss", h["train_loss"])
    live.log_metric("train/accuracy", h["train_acc"])
    if h["test_acc"] is not None:
        live.log_metric("test/accuracy", h["test_acc"])
    live.log_metric("epoch_time_s", h["epoch_time_s"])
    live.next_step()


def finish_live(live, live_dir, pred, y_te):
    """The confusion matrix (an empty one where the run diverged: DVC expects the file)."""
    if not live:
        return
    if pred is not None:
        live.log_sklearn_plot("confusion_matrix", y_te.numpy(), pred.numpy(),
                              name="confusion_matrix.json")
    else:
        write_json([], os.path.join(live_dir, "plots", "sklearn", "confusion_matrix.json"))
    live.end()
