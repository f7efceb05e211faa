"""The GPU study's targets (one H200) beside what bench/gpu_study.sh measured: one run alone
(bench.json, the train stage's loop), runs packed together (the archive's measured packings),
the whole GPU half's wall time, and the study's own loop on the same device.

    python -m ablation.gpu.study summary OUT      # prints and writes OUT/summary.md
"""
import json
import os

from ablation.record import archive as gpu_archive

TARGETS = (  # (what, images/s or seconds, goal, at least?) on one H200 (issue 25)
    ("ResNet-18 b16 Adam, one run alone (ours)", "solo18", 11000, True),
    ("ResNet-50 b16 Adam, one run alone (ours)", "solo50", 5000, True),
    ("ResNet-18 b16, runs packed together", "packed", 50000, True),
    ("the whole GPU half, wall seconds", "wall", 480, False),
)


def bench_rows(path):
    """{(model, batch): row} of the Adam rows of a bench.json, {} where there is none."""
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
        return {(r["model"], r["batch"]): r for r in rows if r.get("optimizer") == "adam"}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def summary(out, archive):
    """The targets beside what this command measured (the archive's packings, bench.json's
    solo runs and the study's own loop), printed and written to OUT/summary.md."""
    study = gpu_archive.load_json(gpu_archive.read(os.path.join(out, archive)), "study.json",
                                  out)
    ours, graphs = bench_rows(os.path.join(out, "bench.json")), \
        bench_rows(os.path.join(out, "compiled", "bench.json"))
    pack = study.get("packing") or {}
    cands = pack.get("candidates") or {}
    units = list(study["units"].values())
    complete = all(u["status"] in ("done", "recorded") for u in units)
    got = {"solo18": (ours.get(("resnet18", 16)) or {}).get("ours_ips"),
           "solo50": (ours.get(("resnet50", 16)) or {}).get("ours_ips"),
           "packed": max((c["images_per_s"] for c in cands.values()), default=None),
           "wall": study.get("wall_s") if complete else None}
    best = max(cands, key=lambda n: cands[n]["images_per_s"], default="none")
    ref = (ours.get(("resnet18", 16)) or {}).get("reference_ips")
    where = study["machine"].get("gpu") or "the CPU (a rehearsal: the targets are for one H200)"
    lines = [f"GPU study on {where}; packing {pack.get('mode')}; "
             f"{sum(u['status'] == 'done' for u in units)} of {len(units)} runs done.", "",
             "| target | measured | goal | met |", "|---|---|---|---|"]
    for what, key, goal, at_least in TARGETS:
        v = got[key]
        met = "—" if v is None else "yes" if (v >= goal if at_least else v <= goal) else "no"
        shown = "—" if v is None else f"{v:,.0f}"
        lines.append(f"| {what}{f' ({best})' if key == 'packed' else ''} | {shown} | "
                     f"{'>=' if at_least else '<='} {goal:,} | {met} |")
    cg = (graphs.get(("resnet18", 16)) or {}).get("ours_ips")
    if cg:
        lines.insert(-2, f"| ResNet-18 b16 Adam alone, CUDA graphs (torch.compile "
                         f"reduce-overhead; not what the runs used) | {cg:,.0f} | — | — |")
    lines += ["", f"The study's own loop (per-sample PIL, DataLoader, stock model) for ResNet-18 "
              f"b16 Adam on the same device: {'—' if ref is None else f'{ref:,.0f}'} images/s "
              f"(the study recorded 735 on its GPU)."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text, end="")
