"""The comparison's figure: both sides' per-epoch test accuracy of each ResNet run
(report.compare), from the dvclive curves git holds at each side's commit.

    curves(commits, diff, inherited)   {run: [(epochs, accuracies) per side]}
    plot(data, labels, path)           one panel a run, both sides, PNG written atomically
"""
from ablation.core.cli import bounded
from ablation.core.io import replace_atomic
from ablation.core.outputs import FAMILY, parse_metrics_path
from ablation.record.store import read_curve


def family(path):  # 'resnet', 'svm' or None, from a metrics file's path
    unit = parse_metrics_path(path)
    return FAMILY[unit[0]] if unit else None


def curves(commits, diff, inherited=frozenset()):
    """{run: [(epochs, accuracies) per side]} from each ResNet run's test/accuracy.tsv, on the
    sides where DVC sees the run's metrics file (a stale file left in a commit is not a run),
    and not on TARGET's side where its file is `inherited` (its parent's curve)."""
    out = {}
    for path in sorted(p for p in diff if family(p) == "resnet"):
        stem, pts = path[:-len(".json")], []
        for c, side in zip(commits, ("old", "new")):
            try:
                if all(e.get(side) is None for e in diff[path].values()) or \
                        (side == "new" and path in inherited):
                    raise ValueError(side)
                curve = read_curve(c, path)
                pts.append((list(curve), list(curve.values())))
            except ValueError:  # no run, or not dvclive's two columns: no curve on that side
                pts.append(([], []))
        if any(x for x, _ in pts):
            out[stem.removeprefix("metrics/resnet/")] = pts
    return out


def plot(data, labels, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    n, cols = len(data), min(len(data), 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (name, pts) in zip(axes.flat, data.items()):
        for (x, y), label, style, color in zip(pts, labels, ("o-", "s--"), ("C0", "C1")):
            if x:
                ax.plot(x, y, style, label=label, color=color, ms=5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: whole numbers
        ax.set(title=bounded(name, 60), xlabel="epoch", ylabel="test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    replace_atomic(lambda tmp: fig.savefig(tmp, format="png", dpi=110), path)
    plt.close(fig)
