"""The report's opening: the headline table (the answer at a glance) and the grid's note.

    headline(t, verdicts)  the title, then one line per line of the table (report.tables): the
                           row (its state where not ok), the params that differ between lines
                           (a column each where 8 columns hold them, else one setting column:
                           `cuda, resnet18, batch 16`; those alike named under it), the first
                           metric column with study figures: ours, the study's figure, the
                           verdict of ours against it (report.claims)
    notes(grid)            the grid's note, folded
"""
from ablation.report.format import markdown
from ablation.report.format import value as fmt
from ablation.report.runs import PLAN
from ablation.report.tables import dagger_note, details, label_of

HEADLINE_COLUMNS = 8  # at most: the row, the params that differ, ours, study, verdict
JOINED_DASH = "\u00a0–\u2060\u00a0"  # no-break spaces, a word joiner: no line break at it


def answer_column(grid):
    """The column the headline shows: the grid's first metric column with study figures,
    else its first metric column; None where it has none."""
    metrics = [c for c in grid["columns"] if "metric" in c]
    return next((c for c in metrics if has_study(grid, c)), metrics[0] if metrics else None)


def has_study(grid, c):
    return any(c["label"] in r["study"] for r in grid["rows"])


def headline(t, verdicts):
    """The title, the headline table (module docstring) and, under it, the params alike in
    every row and the † footnote. `verdicts`: {(row id, column label): text}, report.claims'."""
    grid = t.grid
    params = [c["label"] for c in grid["columns"] + grid["extra"] if "param" in c]
    varied = [p for p in params if len({line.params[p] for line in t.lines}) > 1]
    col = answer_column(grid)
    answer = [] if col is None else [f"{col['label']} (ours)"] + (
        ["study", "ours vs study"] if has_study(grid, col) else [])
    if len(varied) <= HEADLINE_COLUMNS - 1 - len(answer):  # a column each
        head = varied
        settings = [[line.params[p] for p in varied] for line in t.lines]
    else:  # more than fit: one column that names them
        head = ["setting"]
        settings = [[", ".join(named(p, line.params[p]) for p in varied)] for line in t.lines]
    rows = [[label_of(line, state=True)] + setting
            + headline_cells(line, col, len(answer), verdicts)
            for line, setting in zip(t.lines, settings)]
    out = [f"# {grid['title']}", ""] + markdown(["row"] + head + answer, rows)
    same = [f"{p} {t.lines[0].params[p]}" for p in params if p not in varied]
    out += ["", f"All rows: {', '.join(same)}."] if same else []
    out += dagger_note(t.lines, [col["label"]] if col else [])
    return "\n".join(out) + "\n"


def named(param, text):
    """One param of the headline's setting column: a name names itself (`cuda`, `resnet18`,
    `adam`), a switch is its label (`pin_memory`, `no pin_memory`), a number keeps its label
    (`lr 0.001`)."""
    if text in ("True", "False"):
        return param if text == "True" else f"no {param}"
    try:
        float(text.replace(",", ""))
    except ValueError:
        if text not in ("None", "—"):
            return text
    return f"{param} {text}"


def headline_cells(line, col, width, verdicts):
    """The headline's cells of column `col` (`width` of them: ours, study, verdict)."""
    if col is None:
        return []
    study = fmt(line.row["study"].get(col["label"]), col.get("fmt"))
    verdict = verdicts.get((line.row["id"], col["label"]), "—") if line.key == PLAN else "—"
    ours = line.cells[col["label"]].ours.replace(" – ", JOINED_DASH)  # [lo – hi] unbroken
    return [ours, study, verdict][:width]


def notes(grid):
    """The grid's note, folded; '' where it has none."""
    return details("Notes on the runs", [grid["note"].strip()]) if grid.get("note") else ""
