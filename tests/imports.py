"""The package's import graph, read from source (every import, function-level ones included):
what test_pipeline (stage deps) and test_layout (layers, no cycles) check."""
import ast
import os

from .helpers import ROOT

SRC = os.path.join(ROOT, "src")


def path_of(module):
    """The file of a dotted module name ('ablation.stages.train'), or None."""
    base = os.path.join(SRC, *module.split("."))
    for p in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(p):
            return p
    return None


def modules():
    """Every module of the package, dotted ('ablation.core.cli'); packages as their name."""
    out = []
    for dirpath, _, files in os.walk(os.path.join(SRC, "ablation")):
        rel = os.path.relpath(dirpath, SRC).replace(os.sep, ".")
        for f in sorted(files):
            if f.endswith(".py"):
                out.append(rel if f == "__init__.py" else f"{rel}.{f[:-3]}")
    return sorted(out)


def direct_imports(module):
    """The package's modules that `module` imports anywhere in its source (dotted names)."""
    path = path_of(module)
    with open(path) as f:
        tree = ast.parse(f.read())
    pkg = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] == "ablation" and path_of(n):
                out.add(n)
    out.discard(module)
    return out


def closure(module):
    """`module` and everything it imports at any depth, with the packages on the way (importing
    ablation.core.cli runs ablation/__init__.py and ablation/core/__init__.py)."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(direct_imports(m))
    return seen


def files(mods):
    """The repository paths of dotted modules: src/ablation/core/cli.py."""
    return {os.path.relpath(path_of(m), ROOT).replace(os.sep, "/") for m in mods}
