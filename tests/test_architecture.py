"""docs/architecture.md names every module in the tree, so the data path it draws stays whole."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bridge", "model", "plugin_host", "presets", "audiofile")


def modules() -> list[str]:
    """Dotted names of every .py module under the packages (a package's __init__ is the package)."""
    out = []
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append(".".join(parts))
    return out


def test_every_module_is_on_the_architecture_page():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([A-Za-z_][\w.]*)`", text))
    mods = modules()
    assert len(mods) > 40 and "bridge.stems.plan" in mods and "audiofile" in mods
    missing = [m for m in mods if m not in named]
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"


# The layers, lowest first: a unit imports only units below it (function-level imports included).
# The same order is drawn in docs/architecture.md, whose table this test reads.
def layers() -> list[list[str]]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("<!-- layers -->")[1]
    rows = [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| layer") and "---" not in ln]
    return [re.findall(r"`([\w.]+)`", r.split("|")[2]) for r in rows]


# What the bridge may use of the engine: its facade, its records, and melodies as chroma.
ENGINE_FACE = ("model.engine", "model.types", "model.conditioning.melody")
# Measurement code, kept off the run-time path: only commands and other benchmark code import it.
BENCH = ("model.bench", "bridge.bench")


def unit_of(module: str, units: set[str]) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in units:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} belongs to no layer in docs/architecture.md")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every import of our packages in a file, at any depth, resolved to the module it names."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                is_module = (ROOT / full.replace(".", "/")).with_suffix(".py").exists() or \
                    (ROOT / full.replace(".", "/") / "__init__.py").exists()
                out.append((node.lineno, full if is_module else node.module))
    return [(ln, m) for ln, m in out if m.split(".")[0] in PACKAGES]


def test_every_import_goes_down_the_layers():
    order = layers()
    rank = {u: i for i, row in enumerate(order) for u in row}
    assert len(order) >= 10 and "model.decode" in rank and "bridge.live" in rank
    wrong = []
    for f in sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if mod in ("bridge", "model"):  # namespaces only: their __init__ is empty
            continue
        src = unit_of(mod, set(rank))
        for line, target in imports_of(f):
            dst = unit_of(target, set(rank))
            where = f"{f.relative_to(ROOT)}:{line} imports {target}"
            if dst != src and rank[dst] >= rank[src]:
                wrong.append(f"{where} ({dst} is not below {src})")
            if src.startswith("bridge.") and src not in ("bridge.commands", "bridge.cli", "bridge.bench") \
                    and target.startswith("model.") and not target.startswith(ENGINE_FACE):
                wrong.append(f"{where} (the bridge uses the engine through {', '.join(ENGINE_FACE)})")
            if dst in BENCH and src not in BENCH + ("bridge.commands",):
                wrong.append(f"{where} (benchmark code on the run-time path)")
    assert not wrong, "\n".join(wrong)


def test_the_layering_check_catches_an_upward_import(tmp_path):
    """The check itself: an engine module importing the bridge is found."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from bridge.daemon import Daemon\n")
    (line, target), = imports_of(f)
    rank = {u: i for i, row in enumerate(layers()) for u in row}
    assert line == 2 and target == "bridge.daemon"
    assert rank[unit_of(target, set(rank))] > rank[unit_of("model.decode.loop", set(rank))]


def deferred_imports(path: Path) -> list[tuple[int, str]]:
    """Imports inside a function that should not wait there: any of the standard library (it costs
    nothing at the top), and any other without a comment on its line (or the line before) saying
    why it waits: the one allowed reason is an optional or heavy dependency (torch, transformers,
    Ray, PortAudio, JACK) that a caller of this module need not load."""
    src = path.read_text(encoding="utf-8")
    lines = src.split("\n")
    out = []
    for fn in ast.walk(ast.parse(src)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level:
                names = ["bridge"]  # a relative import is always ours
            here, before = lines[node.lineno - 1], lines[node.lineno - 2].strip()
            stdlib = any(n.split(".")[0] in sys.stdlib_module_names for n in names)
            if stdlib or ("#" not in here and not before.startswith("#")):
                out.append((node.lineno, ast.unparse(node)))
    return out


def test_every_deferred_import_says_why():
    """No import waits inside a function unless a comment says what it spares: import cycles are
    broken by moving code, not hidden by deferring an import, and the standard library is never
    deferred."""
    found = [f"{f.relative_to(ROOT)}:{line}: {stmt}"
             for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py")) for line, stmt in deferred_imports(f)]
    assert not found, "\n".join(found)


def test_the_deferred_import_check_catches_a_silent_one(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from model.engine import Engine  # torch loads only where this runs\n\n"
                 "def g():\n    from bridge.daemon import Daemon\n    import json  # a comment does not excuse it\n"
                 "    import mido\n")
    assert deferred_imports(f) == [(5, "from bridge.daemon import Daemon"), (6, "import json"), (7, "import mido")]
