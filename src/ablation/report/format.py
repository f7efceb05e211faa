"""One table formatter for report, compare and show: how a value reads in a cell, a Markdown
table, and the aligned text table of a terminal.

    value(v, spec)           None '—', NaN 'NaN', ±inf 'inf' / '-inf', a number by `spec` (a
                             format spec or a function; default: thousands separators from
                             1,000, else 4 significant digits), text bounded
    signed(v, spec)          value() with a sign on every number: a difference (Δ)
    markdown(head, rows)     the lines of a Markdown table (cells are Markdown already)
    aligned(head, rows, width, right)
                             aligned columns that fit `width`: the last column takes what the
                             others leave, control characters become '?'
"""
import math
import re

from ablation.core.cli import bounded

MISSING = "—"
MIN_LAST = 16  # aligned(): the last column gets at least this many characters
ZERO = re.compile(r"[-+][0.,]*(?:e[-+]?\d+)?%?")  # a signed value that reads as zero
SIGN = re.compile(r"((?:.?[<>=^])?)[-+ ]?", re.S)  # a format spec's [[fill]align][sign]


def is_number(v):
    """An int or float, finite or not (bools are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def value(v, spec=None, limit=80):
    if v is None:
        return MISSING
    if not is_number(v):
        return bounded(str(v), limit)
    try:
        if not math.isfinite(v):
            return "NaN" if v != v else ("inf" if v > 0 else "-inf")
        if callable(spec):
            return bounded(spec(v), limit)
        if spec:
            return bounded(format(v, spec), limit)
        return format(v, default_spec(v))
    except (OverflowError, ValueError):
        return bounded(str(v), limit)


def default_spec(v):
    return ",.0f" if abs(v) >= 1000 else ".4g"


def signed(v, spec=None):
    """value(v, spec) with a sign (+1,878,548, -0.27): the spec's sign set to '+', value()'s
    default spec where there is none; a difference that reads as zero at the spec's digits
    has none (0.00, not -0.00)."""
    if callable(spec):
        text = value(v, spec)
        return "+" + text if is_number(v) and v >= 0 and text[:1] not in "+-" else text
    if is_number(v) and not spec and math.isfinite(v):
        spec = default_spec(v)
    text = value(v, SIGN.sub(r"\1+", spec, count=1) if spec else spec)
    return text[1:] if ZERO.fullmatch(text) else text


def markdown(head, rows):
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def printable(text):
    """Text from files as it may reach a terminal: control characters (escape sequences,
    newlines) become '?'."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def aligned(head, rows, width, right=()):
    """Aligned text; the last column takes what the other columns leave of `width`, and a
    line still wider (long names on a narrow terminal) is cut at `width`. `right`: the indices
    of right-aligned (number) columns."""
    head = tuple(printable(c) for c in head)
    rows = [tuple(printable(c) for c in r) for r in rows]
    fixed = [max(len(r[i]) for r in [head] + rows) for i in range(len(head) - 1)]
    room = max(MIN_LAST, width - sum(fixed) - 2 * (len(head) - 1))

    def line(r):
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, fixed))]
        last = r[-1] if len(r[-1]) <= room else r[-1][:room - 1] + "…"
        text = "  ".join(cells + [last]).rstrip()
        return text if len(text) <= width else text[:width - 1] + "…"
    rule = tuple("-" * w for w in fixed) + ("-" * min(room, max(len(r[-1]) for r in
                                                                [head] + rows)),)
    return "\n".join([line(head), line(rule)] + [line(r) for r in rows])
