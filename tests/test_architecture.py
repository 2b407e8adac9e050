"""docs/architecture.md names every module in the tree, so the data path it draws stays whole."""

from __future__ import annotations

import re
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
    assert len(mods) > 40 and "bridge.stem_plan" in mods and "audiofile" in mods
    missing = [m for m in mods if m not in named]
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"
