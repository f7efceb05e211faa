"""DVC plots draw without network: `dvc plots show`/`diff` HTML opened in headless Chromium.

The page comes from plots/offline.html (`.dvc/config` plots.html_template), which inlines vega,
vega-lite and vega-embed and draws SVG, so `--dump-dom` shows the marks as <path> elements. The
same plots on DVC's own page (libraries from a CDN) must draw nothing: the network really is off.
Chromium: tests/browser/ensure_chromium.sh installs it; without it the test skips (fails if
CI=true: the `chromium` fixture, tests/conftest.py).
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from .helpers import ROOT, dump_dom

DVC = os.path.join(os.path.dirname(sys.executable), "dvc")


def pairs():
    with open(os.path.join(ROOT, "params.yaml")) as f:
        p = yaml.safe_load(f)
    return [(d, m) for d in p["data"]["datasets"] for m in p["train"]["models"]]


def accuracy_tsv(d, m):
    return f"metrics/resnet/{d}/{m}/plots/metrics/test/accuracy.tsv"


def confusion_json(d, m):
    return f"metrics/resnet/{d}/{m}/plots/sklearn/confusion_matrix.json"


@pytest.fixture
def repo(tmp_path):
    """A git + DVC copy of what `dvc plots` reads (config, dvc.yaml, template, metrics),
    committed."""
    r = tmp_path / "repo"
    for f in ["dvc.yaml", "params.yaml", ".dvc/config", "plots/offline.html"]:
        os.makedirs(os.path.dirname(r / f), exist_ok=True)
        shutil.copy(os.path.join(ROOT, f), r / f)
    for d, m in pairs():
        shutil.copytree(os.path.join(ROOT, f"metrics/resnet/{d}/{m}/plots"),
                        r / f"metrics/resnet/{d}/{m}/plots")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost",
           "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "plots"]):
        subprocess.run(git + cmd, cwd=r, check=True, capture_output=True)
    return r


def dvc(repo, *args):
    r = subprocess.run([DVC, *args], cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def drawn(page, dom):
    """{plot div id: {mark group class: number of <path d="..."> drawn in it}} for every plot."""
    ids = re.findall(r"vegaEmbed\('#([^']+)'", page.read_text(encoding="utf8"))
    assert ids, f"no vega plots in {page}"
    starts = [re.search(f'<div id="{i}"[ >]', dom).start() for i in ids]
    out = {}
    for i, a, b in zip(ids, starts, starts[1:] + [len(dom)]):
        groups = re.findall(r'<g class="(mark-\w+ role-mark [^"]*)"[^>]*>(.*?)</g>', dom[a:b], re.S)
        out[i] = counts = {}
        for cls, body in groups:  # a line per series: one group each, same class
            counts[cls] = counts.get(cls, 0) + len(re.findall(r'<path[^>]* d="M', body))
    return out


def test_top_level_plots_cover_every_trained_model():
    with open(os.path.join(ROOT, "dvc.yaml")) as f:
        defs = {k: v for e in yaml.safe_load(f)["plots"] for k, v in e.items()}
    acc = defs["test_accuracy"]
    assert set(acc["y"]) == {accuracy_tsv(d, m) for d, m in pairs()}
    assert (acc["x"], acc["x_label"], acc["y_label"]) == ("step", "epoch", "test accuracy %")
    for d, m in pairs():
        cm = defs[f"confusion_{d}_{m}"]
        assert (cm["template"], cm["x"], cm["y"]) == ("confusion", "actual",
                                                      {confusion_json(d, m): "predicted"})


def test_template_is_built_from_vendor_and_configured():
    r = subprocess.run([sys.executable, "plots/build_template.py", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(ROOT, "plots/offline.html"), encoding="utf8") as f:
        page = f.read()
    assert "{plot_divs}" in page and "{scripts}" not in page  # {scripts}: DVC's CDN tags
    assert not re.search(r"<script[^>]*src=", page)
    with open(os.path.join(ROOT, ".dvc/config")) as f:  # DVC reads it relative to .dvc/
        assert re.search(r"html_template = \.\./plots/offline\.html", f.read())


def test_plots_render_offline(repo, tmp_path, chromium):
    n = len(pairs())
    # show: the configured offline page; every plot draws, with real numbers of marks
    dvc(repo, "plots", "show", "-o", str(tmp_path / "show"))
    page = tmp_path / "show" / "index.html"
    marks = drawn(page, dump_dom(chromium, page, tmp_path / "p1"))
    assert {"test_accuracy", *(f"confusion_{d}_{m}" for d, m in pairs())} <= set(marks)
    for i, groups in marks.items():
        assert sum(groups.values()) > 0, f"{i}: no marks drawn"
    lines = [v for k, v in marks["test_accuracy"].items() if k.startswith("mark-line")]
    assert max(lines) == n  # one curve per (dataset, model)
    for d, m in pairs():  # 10 x 10 cells (imputed to 0 where no image fell)
        rects = [v for k, v in marks[f"confusion_{d}_{m}"].items() if k.startswith("mark-rect")]
        assert max(rects) == 100

    # diff: workspace (one accuracy changed) against HEAD, two curves per model
    tsv = repo / accuracy_tsv(*pairs()[0])
    tsv.write_text(tsv.read_text().replace("\t9", "\t8"))
    dvc(repo, "plots", "diff", "-o", str(tmp_path / "diff"))
    page = tmp_path / "diff" / "index.html"
    dom = dump_dom(chromium, page, tmp_path / "p2")
    marks = drawn(page, dom)
    lines = [v for k, v in marks["test_accuracy"].items() if k.startswith("mark-line")]
    assert max(lines) == 2 * n
    assert ">HEAD</text>" in dom and ">workspace</text>" in dom

    # control: DVC's own page loads the libraries from a CDN and must draw nothing
    from dvc_render.html import PAGE_HTML
    (tmp_path / "cdn.html").write_text(PAGE_HTML, encoding="utf8")
    dvc(repo, "plots", "show", "--html-template", str(tmp_path / "cdn.html"),
        "-o", str(tmp_path / "cdn"))
    page = tmp_path / "cdn" / "index.html"
    assert "https://cdn.jsdelivr.net/npm/vega@" in page.read_text(encoding="utf8")
    marks = drawn(page, dump_dom(chromium, page, tmp_path / "p3"))
    assert marks and not any(sum(g.values()) for g in marks.values())
