"""The report's figures, drawn from the runs that ran their row as planned: accuracy against
training time and against GFLOPs (ours filled with error bars over seeds, the study's hollow,
joined), and per-epoch test-accuracy curves. Labels come from the grid's columns."""
import math
import os

import pandas as pd

from ablation.core.io import replace_atomic
from ablation.core.outputs import LISTS, WHICH
from ablation.record.run import is_number
from ablation.report.runs import param_value, planned
from ablation.training.overrides import fmt_value

NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "resnet18": "ResNet-18",
         "resnet34": "ResNet-34", "resnet50": "ResNet-50", "rbf": "RBF", "poly": "poly"}
SHORT = {"batch_size": "bs{}", "lr": "lr{}", "epochs": "{}ep", "pin_memory": "pin",
         "train_samples": "{} samples", "train_limit": "{} images"}  # figure labels
WHAT = ("data.datasets", "train.models", "svm.kernels")  # params that name what ran
XMETRIC = {"train_time_ms": "train_ms", "gflops": "gflops"}  # x metrics: their frame column


def short_num(v):
    """1e-3, 1.5e-4, 16, 10k: numbers as a figure label wants them."""
    if isinstance(v, float) and v and abs(v) < 0.01:
        m, _, e = f"{v:e}".partition("e")
        return f"{m.rstrip('0').rstrip('.')}e{int(e)}"
    if isinstance(v, int) and v >= 1000 and v % 1000 == 0:
        return f"{v // 1000}k"
    return f"{v:g}"


def setting(dotted, v):
    """One param value in a figure label: 'bs16', 'lr1e-3', '15ep', 'adam', 'no pin'."""
    key = dotted.partition(".")[2]
    if isinstance(v, bool):
        return SHORT.get(key, key) if v else f"no {SHORT.get(key, key)}"
    if is_number(v):
        return SHORT.get(key, key + " {}").format(short_num(v))
    return NAMES.get(v, v) if isinstance(v, str) else fmt_value(v)


def point_labels(grid, frame, acc):
    """{(row id, column index): text} for the figures: the dataset where it varies, the model
    (or kernel), and the values of the param columns that tell the rows apart, from the params
    the row's planned runs recorded (the plan's for a row with none). With several accuracy
    columns each has its own panel, titled by its label: what the column names is left out."""
    cols = grid["columns"] + grid["extra"]
    plan = planned(frame)
    params = {r["id"]: r["params"] for r in grid["rows"]}
    for rid, g in (plan.groupby("row", sort=False) if len(plan) else []):
        params[rid] = g.iloc[0]["params"] or params[rid]
    pcols = [c["param"] for c in cols if "param" in c and c["param"] not in WHAT]

    def val(p, dotted):
        return param_value(p, dotted) if dotted.partition(".")[0] in p else None
    varying = [k for k in pcols if len({repr(val(p, k)) for p in params.values()}) > 1]

    def what(rid, i):  # (dataset, model or kernel) of the file column i reads, where one
        c, p = cols[i], params[rid]
        one = {w: None if len(acc) > 1 and w in c else c.get(w) or val(p, ".".join(LISTS[w]))
               for w in WHICH[c["stage"]]}
        one = {w: v for w, v in one.items() if isinstance(v, str)}
        return one.get("dataset"), one.get("model") or one.get("kernel")
    whats = {(r["id"], i): what(r["id"], i) for r in grid["rows"] for i in acc}
    show_ds = len({d for d, _ in whats.values()}) > 1
    out = {}
    for (rid, i), (ds, model) in whats.items():
        parts = ([NAMES.get(ds, ds)] if show_ds and ds else []) + \
            ([NAMES.get(model, model)] if model else []) + \
            [setting(k, val(params[rid], k)) for k in varying]
        out[rid, i] = " ".join(parts) or rid
    same = [(i, t) for (_, i), t in out.items()]
    return {k: f"{t} ({k[0]})" if same.count((k[1], t)) > 1 else t for k, t in out.items()}


def figure_points(grid, frame, xmetric):
    """One point per (row, accuracy column) for the accuracy-vs-`xmetric` figure: ours as the
    mean over the row's planned runs with the std over seeds (n > 1), and the study's values of
    the same row where its table has both. A row with no planned run that finished has only
    the study's point (n 0), its label saying why."""
    cols = grid["columns"] + grid["extra"]
    acc = [i for i, c in enumerate(cols) if c.get("metric") == "test_accuracy"]
    labels = point_labels(grid, frame, acc)
    plan = planned(frame)
    finished = set(frame["row"]) if len(frame) else set()
    ran_as_planned = set(plan["row"]) if len(plan) else set()
    which = ("stage", "dataset", "model", "kernel")
    out = []
    for i in acc:
        c = cols[i]
        sx = next((s["label"] for s in grid["columns"] if s.get("metric") == xmetric
                   and all(s.get(w) == c.get(w) for w in which)), None)
        for r in grid["rows"]:
            p = {"row": r["id"], "col": i, "label": labels[r["id"], i], "n": 0,
                 "x": None, "y": None, "sx": None, "sy": None,
                 "study_x": r["study"].get(sx), "study_y": r["study"].get(c["label"])}
            g = plan[plan["row"] == r["id"]] if len(plan) else plan
            xy = pd.DataFrame({
                "x": pd.to_numeric(g[f"{XMETRIC[xmetric]}_{i}"], errors="coerce"),
                "y": pd.to_numeric(g[f"value_{i}"], errors="coerce")}).dropna() \
                if len(g) else pd.DataFrame()
            if len(xy):
                p.update(n=len(xy), x=float(xy["x"].mean()), y=float(xy["y"].mean()))
                if len(xy) > 1:
                    p.update(sx=float(xy["x"].std()), sy=float(xy["y"].std()))
            elif p["study_x"] is None or p["study_y"] is None:
                continue
            else:
                p["label"] += " (no numbers)" if r["id"] in ran_as_planned else \
                    " (not run as planned)" if r["id"] in finished else " (not run)"
            out.append(p)
    return out


def time_ticks(lo, hi):
    """Tick positions (s) on a log time axis: the coarsest ladder with >= 3 ticks in range."""
    ladders = [[1, 10, 60, 600, 3600, 36000],
               [1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 18000, 36000],
               [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 30, 40, 60, 90, 120, 180, 300, 600, 900,
                1200, 1800, 2700, 3600, 5400, 7200, 14400, 36000]]
    for ladder in ladders:
        ticks = [t * 10.0 ** k for k in range(-3, 0) for t in ladder if t < 10] + \
            [float(t) for t in ladder]
        ticks = [t for t in sorted(set(ticks)) if lo <= t <= hi]
        if len(ticks) >= 3:
            return ticks[::2] if len(ticks) > 8 else ticks
    return ticks


def fmt_seconds(s, _pos=None):
    if s < 1:
        return f"{s * 1000:g} ms"
    if s < 60:
        return f"{s:g} s"
    return f"{s / 60:g} min" if s < 3600 else f"{s / 3600:g} h"


def place_labels(ax, items, points, segments):
    """Annotate each (x, y, text, colour) next to its point where the text overlaps no other
    label, none of `points` (x, y), `segments` ((x0, y0), (x1, y1)) nor the axes' edge; the
    least overlap where none is free. Offsets are in points, so the layout must be final
    (tight_layout done) before this runs."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    r = 5 * fig.dpi / 72  # a marker's radius in pixels
    marks = [(px - r, py - r, px + r, py + r) for px, py in ax.transData.transform(points)]
    for a, b in segments:  # lines and error bars: small boxes every few pixels along them
        (ax0, ay0), (bx0, by0) = ax.transData.transform([a, b])
        steps = max(1, int(math.hypot(bx0 - ax0, by0 - ay0) / 4))
        marks += [(ax0 + (bx0 - ax0) * k / steps - 1.5, ay0 + (by0 - ay0) * k / steps - 1.5,
                   ax0 + (bx0 - ax0) * k / steps + 1.5, ay0 + (by0 - ay0) * k / steps + 1.5)
                  for k in range(steps + 1)]
    placed = []

    def overlap(a, b):
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * \
            max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    cands = [(rad * dx, rad * dy) for rad in (5, 12, 22, 34, 50)
             for dx, dy in ((1, 0), (1, 0.7), (1, -0.7), (-1, 0), (-1, 0.7), (-1, -0.7),
                            (0, 1), (0, -1))]
    for x, y, text, color in items:
        best = None
        for dx, dy in cands:
            kw = dict(xytext=(dx, dy), textcoords="offset points", fontsize=8, color=color,
                      ha="left" if dx > 0 else "right" if dx < 0 else "center",
                      va="bottom" if dy > 0 else "top" if dy < 0 else "center")
            a = ax.annotate(text, (x, y), **kw)
            e = a.get_window_extent(renderer)
            a.remove()
            bb = (e.x0, e.y0, e.x1, e.y1)
            inside = overlap(bb, (box.x0, box.y0, box.x1, box.y1))
            score = (e.width * e.height - inside) * 10 + sum(
                overlap(bb, o) for o in placed + marks)
            if best is None or score < best[0]:
                best = (score, kw, bb)
            if score == 0:
                break
        _, kw, bb = best
        if max(abs(v) for v in kw["xytext"]) > 12:  # far from its point: a leader line
            kw["arrowprops"] = dict(arrowstyle="-", color=color, lw=0.6, alpha=0.7,
                                    shrinkA=0, shrinkB=4)
        ax.annotate(text, (x, y), **kw)
        placed.append(bb)


def panels(n, height):
    """A figure with one axes per accuracy column: one wide, or two per line."""
    import matplotlib.pyplot as plt
    ncols, nrows = min(n, 2), math.ceil(n / 2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(9 if n == 1 else 14, height * nrows + 1.2),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.remove()
    return fig, list(axes.flat[:n])


def draw_points(ax, pts, colour, scale):
    """One panel's points, joining lines and error bars; returns the label items, every point
    drawn and the segments, for place_labels."""
    items, xys, segs = [], [], []
    for p in pts:
        c = colour[p["row"]]
        ours = (p["x"] / scale, p["y"]) if p["n"] else None
        study = (p["study_x"] / scale, p["study_y"]) \
            if p["study_x"] is not None and p["study_y"] is not None else None
        if ours and study:
            ax.plot(*zip(ours, study), color=c, lw=0.8, alpha=0.6, zorder=1)
            segs.append((ours, study))
        if ours:
            ax.scatter(*ours, s=50, color=c, zorder=3)
            if p["n"] > 1:
                ax.errorbar(*ours, xerr=p["sx"] / scale, yerr=p["sy"], fmt="none", ecolor=c,
                            elinewidth=1, capsize=3, zorder=2)
                (x, y), dx, dy = ours, p["sx"] / scale, p["sy"]
                segs += [((x - dx, y), (x + dx, y)), ((x, y - dy), (x, y + dy))]
                xys += [(x - dx, y), (x + dx, y), (x, y - dy), (x, y + dy)]
        if study:
            ax.scatter(*study, s=60, facecolors="none", edgecolors=c, linewidths=1.5, zorder=3)
        xys += [q for q in (ours, study) if q]
        items.append((*(ours or study), p["label"], c))
    return items, xys, segs


def set_limits(ax, xys, logx):
    """Axis ranges with room for labels; on a log time axis, ticks that read '30 s', '2 min'."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    xs, ys = [x for x, _ in xys if x > 0 or not logx] or [1.0], [y for _, y in xys]
    lo, hi = min(xs), max(xs)
    if logx:
        pad = max(math.log10(hi / lo), 0.3) * 0.12
        ax.set_xscale("log")
        ax.set_xlim(lo / 10 ** pad, hi * 10 ** pad)
        ax.xaxis.set_major_locator(FixedLocator(time_ticks(*ax.get_xlim())))
        ax.xaxis.set_major_formatter(FuncFormatter(fmt_seconds))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training time (log scale; what each run recorded as train_time_ms)")
    else:
        pad = max(hi - lo, abs(hi) * 0.2, 1e-9) * 0.12
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel("forward GFLOPs per image")
    pad = max(max(ys) - min(ys), 1.0) * 0.1
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_ylabel("test accuracy %")
    ax.grid(True, which="major", alpha=0.3)


def scatter_figure(grid, frame, xmetric):
    """Test accuracy against training time (log x) or GFLOPs, a panel per accuracy column: ours
    filled (mean, error bars ±1 std over seeds), the study's hollow in the same colour, a thin
    line joining them, each pair labelled. None without a point of ours."""
    import matplotlib
    from matplotlib.lines import Line2D
    pts = figure_points(grid, frame, xmetric)
    acc = list(dict.fromkeys(p["col"] for p in pts if p["n"]))
    if not acc:
        return None
    pts = [p for p in pts if p["col"] in acc]
    rows = list(dict.fromkeys(p["row"] for p in pts))
    cmap = matplotlib.colormaps["tab10" if len(rows) <= 10 else "tab20"]
    colour = {rid: cmap(k % cmap.N) for k, rid in enumerate(rows)}
    scale, logx = (1000.0, True) if xmetric == "train_time_ms" else (1.0, False)  # ms -> s
    fig, axes = panels(len(acc), 5.0)
    cols = grid["columns"] + grid["extra"]
    drawn = []
    for ax, i in zip(axes, acc):
        drawn.append(draw_points(ax, [p for p in pts if p["col"] == i], colour, scale))
        set_limits(ax, drawn[-1][1], logx)
        if len(acc) > 1:
            ax.set_title(cols[i]["label"], fontsize=10)
    fig.suptitle(f"{grid['title']}\ntest accuracy vs {'training time' if logx else 'GFLOPs'}",
                 fontsize=11)
    ns = sorted({p["n"] for p in pts if p["n"]})
    n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    handles = [Line2D([], [], marker="o", color="0.35", ls="none",
                      label=f"filled: ours, n={n} seed(s) per row"
                            + (": mean, bars ±1 std" if ns[-1] > 1 else ""))]
    if any(p["study_x"] is not None and p["study_y"] is not None for p in pts):
        handles += [Line2D([], [], marker="o", mfc="none", mec="0.35", ls="none",
                           label="hollow: the study (same colour = same row)"),
                    Line2D([], [], color="0.35", lw=0.8, label="line: ours to the study's")]
    elif any(p["study_y"] is not None for p in pts):
        handles += [Line2D([], [], ls="none", label=f"(the study gives no "
                                                    f"{'training time' if logx else 'GFLOPs'})")]
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=len(handles),
               frameon=False)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    for ax, (items, xys, segs) in zip(axes, drawn):
        place_labels(ax, items, xys, segs)
    return fig


def row_curves(grid, frame, acc):
    """{column index: [(row id, frame of epoch x run)]}: the per-epoch test accuracy each
    planned run's record keeps for the file column i reads."""
    plan = planned(frame)
    curves = {}
    for i in acc:
        for rid, g in (plan.groupby("row", sort=False) if len(plan) else []):
            runs = [pd.Series(c) for run, path in zip(g["run"], g[f"file_{i}"])
                    if (c := run.curves.get(path))]
            if runs:
                curves.setdefault(i, []).append((rid, pd.concat(runs, axis=1)))
    return curves


def curves_figure(grid, frame):
    """Test accuracy per epoch, a panel per accuracy column of a train stage, one line per row
    (mean over its planned runs' seeds, a band of ±1 std where n > 1; a point with a bar when
    there is one epoch), from the curves each run's record keeps. None without any."""
    import matplotlib
    from matplotlib.ticker import FixedLocator
    cols = grid["columns"] + grid["extra"]
    acc = [i for i, c in enumerate(cols) if c.get("metric") == "test_accuracy"
           and c["stage"] == "train"]
    labels = point_labels(grid, frame, acc)
    curves = row_curves(grid, frame, acc)
    if not curves:
        return None
    rows = list(dict.fromkeys(rid for cs in curves.values() for rid, _ in cs))
    cmap = matplotlib.colormaps["tab10" if len(rows) <= 10 else "tab20"]
    fig, axes = panels(len(curves), 4.5)
    for ax, (i, cs) in zip(axes, curves.items()):
        top = max(int(df.index.max()) for _, df in cs)
        for k, (rid, df) in enumerate(cs):
            mean, sd, n = df.mean(axis=1), df.std(axis=1), df.shape[1]
            c = cmap(rows.index(rid) % cmap.N)
            label = f"{labels[rid, i]} (n={n})"
            if top == 1:  # one epoch: a point, not a line, side by side so none hides another
                x = 1 + 0.5 * (k - (len(cs) - 1) / 2) / len(cs)
                ax.errorbar([x], mean, yerr=sd if n > 1 else None, fmt="o", color=c,
                            capsize=3, label=label)
            else:
                ax.plot(mean.index, mean, marker="o", ms=3, color=c, label=label)
                if n > 1:
                    ax.fill_between(mean.index, mean - sd, mean + sd, color=c, alpha=0.15,
                                    lw=0)
        lo = min(float((df.mean(axis=1) - df.std(axis=1).fillna(0)).min()) for _, df in cs)
        hi = max(float((df.mean(axis=1) + df.std(axis=1).fillna(0)).max()) for _, df in cs)
        pad = max(hi - lo, 2.0) * 0.15  # at least 0.3 points either side
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
        ax.set_xlim(0.5, top + 0.5)
        ax.xaxis.set_major_locator(FixedLocator(range(1, top + 1, math.ceil(top / 12))))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy %")
        ax.grid(True, alpha=0.3)
        if len(curves) > 1:
            ax.set_title(cols[i]["label"], fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(f"{grid['title']}\ntest accuracy after each epoch (ours: mean over n seeds, "
                 f"±1 std)", fontsize=11)
    fig.tight_layout()
    return fig


def figures(grid, frame, outdir):
    """PNG figures beside the report, from the runs that ran their row as planned."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    for fname, make in (("acc_vs_time", lambda: scatter_figure(grid, frame, "train_time_ms")),
                        ("gflops_vs_acc", lambda: scatter_figure(grid, frame, "gflops")),
                        ("curves", lambda: curves_figure(grid, frame))):
        fname, fig = f"{grid['name']}_{fname}.png", make()
        if fig is not None:
            made.append(save_png(plt, fig, outdir, fname))
    return made


def save_png(plt, fig, outdir, fname):
    """Write `fig` as outdir/fname, never half-written (a temp sibling, then renamed), and close
    it; returns fname."""
    try:
        replace_atomic(lambda tmp: fig.savefig(tmp, dpi=110, format="png"),
                       os.path.join(outdir, fname))
    finally:
        plt.close(fig)
    return fname
