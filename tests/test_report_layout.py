"""A report opens with its answer where people read it: reports/table3.md, rebuilt from the
committed record, rendered as GitHub renders Markdown and measured in headless Chromium.

The page: markdown-it-py (CommonMark with GFM tables and inline HTML on, for the <details>
blocks) inside a page styled like GitHub's markdown body: its font (16px/1.5, the system
font stack) and its table CSS (`display: block; width: max-content; max-width: 100%;
overflow: auto`, cells padded 6px 13px, 1px borders).

Assumption: GitHub's view of a Markdown file in a 1280-pixel window with the file tree open
leaves the body a content column of about 880 px (1280 − the 320 px file tree − the file box's
32 px padding each side − gutters of about 16 px). The page reproduces it: a 320 px column for
the tree, then the body, 880 px wide with 32 px padding, in a 1280-pixel window. None of
GitHub's first fonts is on a Linux machine: Chromium falls back to its sans-serif (DejaVu
Sans), wider than Segoe UI or San Francisco, so the text measures wider here than on most
readers' screens, which errs on the safe side. The first screen: a 1280 x 800 window (a
laptop's), GitHub's own header, repository bar, breadcrumbs and file box header taking about
280 px above the body (a block of that height stands for them).

Chromium: tests/browser/ensure_chromium.sh installs it; without it the test skips (fails if
CI=true: the `chromium` fixture, tests/conftest.py).
"""
import html
import json
import os
import re

from markdown_it import MarkdownIt

from ablation.grid.schema import load
from ablation.record import store
from ablation.report import claims, command, tables

from .helpers import ROOT, chromium_run, dump_dom

WINDOW = "--window-size=1280,800"
GITHUB_TOP = 280  # px of GitHub's page above a file's rendered Markdown
MAX_COLUMNS = 8  # what a reader takes in at a glance
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>report</title><style>
body {{ margin: 0; background: #fff; color: #1f2328; }}
.layout {{ display: flex; }}
.tree {{ flex: 0 0 320px; }}
.markdown-body {{ box-sizing: content-box; width: 880px; padding: 32px; word-wrap: break-word;
  font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", "Noto Sans", Helvetica, Arial,
  sans-serif, "Apple Color Emoji", "Segoe UI Emoji"; font-size: 16px; line-height: 1.5; }}
.markdown-body table {{ border-spacing: 0; border-collapse: collapse; display: block;
  width: max-content; max-width: 100%; overflow: auto; font-variant: tabular-nums; }}
.markdown-body table th {{ font-weight: 600; }}
.markdown-body table th, .markdown-body table td {{ padding: 6px 13px;
  border: 1px solid #d1d9e0; }}
.markdown-body table tr {{ background-color: #fff; border-top: 1px solid #d1d9e0b3; }}
.markdown-body table tr:nth-child(2n) {{ background-color: #f6f8fa; }}
.markdown-body img {{ max-width: 100%; box-sizing: content-box; }}
</style></head><body>
<header style="height: {top}px"></header>
<div class="layout"><nav class="tree"></nav><article class="markdown-body">
{body}
</article></div>
<pre id="measured" hidden></pre>
<script>
window.addEventListener("load", () => {{
const t = document.querySelector(".markdown-body table");
const head = [...t.rows[0].cells].map(c => c.textContent.trim());
const v = head.indexOf("ours vs study");
const row = [...t.rows].slice(1).find(r => r.cells[v].textContent.trim() !== "—");
const range = document.createRange();
range.selectNodeContents(row.cells[v]);
const box = range.getBoundingClientRect();
document.getElementById("measured").textContent = JSON.stringify({{
  first: head[0], columns: head.length, scrollWidth: t.scrollWidth,
  clientWidth: t.clientWidth, verdict: row.cells[v].textContent.trim(), left: box.left,
  right: box.right, width: box.width, top: box.top, bottom: box.bottom,
  row: row.cells[0].textContent.trim(), viewport: document.documentElement.clientWidth,
  height: window.innerHeight, page: document.documentElement.scrollWidth}});
}});
</script></body></html>
"""


def render(md_path):
    """The report as a page (PAGE) beside it, where its figures are."""
    md = MarkdownIt("commonmark", {"html": True}).enable("table")
    page = md_path.parent / "page.html"
    page.write_text(PAGE.format(body=md.render(md_path.read_text()), top=GITHUB_TOP),
                    encoding="utf8")
    return page


def measured(dom):
    m = re.search(r'<pre id="measured"[^>]*>(.*?)</pre>', dom, re.S)
    assert m and m.group(1), dom[-3000:]
    return json.loads(html.unescape(m.group(1)))


def test_headline_fits_a_1280_window(tmp_path, monkeypatch, chromium):
    """The first table is the headline: at most 8 columns, no horizontal scroll in the body's
    880 px, and its first verdict, the report's own for that row, on the first screen; the
    page also renders to a non-empty screenshot."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "r"
    command.main(os.path.join("grids", "table3.yaml"), str(out), runs={})
    page = render(out / "table3.md")
    m = measured(dump_dom(chromium, page, tmp_path / "p1", WINDOW))
    assert m["first"] == "row" and m["columns"] <= MAX_COLUMNS, m
    assert m["scrollWidth"] <= m["clientWidth"], m  # no horizontal scroll bar
    g = load(os.path.join("grids", "table3.yaml"))
    _, frame = tables.build(g, store.load(os.path.join("reports", "table3.json")))
    assert m["verdict"] == claims.row_verdicts(g, frame)[(m["row"].split()[0], "test acc %")], m
    assert m["width"] > 0 and 0 <= m["left"] and m["right"] <= m["viewport"], m
    assert GITHUB_TOP < m["top"] and m["bottom"] <= m["height"], m  # on the first screen
    assert m["page"] <= m["viewport"], m  # nothing else scrolls the page sideways
    shot = tmp_path / "shot.png"
    chromium_run(chromium, page, tmp_path / "p2", WINDOW, f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
