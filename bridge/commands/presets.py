"""`musicbridge presets`: list the shipped and user presets, or show one in full."""

from __future__ import annotations

import argparse
import json
import sys

from presets import SHIPPED_DIR, PresetError, load_preset, load_preset_file, preset_files, user_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list presets (prompt, params, effect chain)",
                       description="List the presets: shipped ones and those in the user folder "
                                   "($MUSICBRIDGE_PRESETS or ~/.config/musicbridge/presets), which "
                                   "override shipped ones of the same name.")
    p.add_argument("name", nargs="?", help="show this preset in full")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.name:
        preset = load_preset(args.name)
        if args.json:
            print(json.dumps(preset.to_dict(), indent=2))
            return 0
        print(f"{preset.name}: {preset.description}")
        print(f"  file:   {preset.source}")
        print(f"  prompt: {preset.prompt}" + (" (+ '<bpm> bpm')" if preset.add_bpm else ""))
        print(f"  params: {', '.join(f'{k}={v}' for k, v in preset.params.items()) or '(defaults)'}")
        for i, c in enumerate(preset.chain):
            rest = ", ".join(f"{k}={v}" for k, v in c.items() if k != "plugin")
            print(f"  chain[{i}]: {c['plugin']}" + (f" ({rest})" if rest else ""))
        return 0

    good, bad = [], []
    for name, path in preset_files().items():
        try:
            good.append(load_preset_file(path))
        except PresetError as e:
            bad.append(str(e))
    if args.json:
        print(json.dumps({"presets": [p.to_dict() for p in good], "errors": bad}, indent=2))
    else:
        width = max((len(p.name) for p in good), default=0)
        for p in good:
            where = "user" if p.source and p.source.parent != SHIPPED_DIR else "shipped"
            chain = " > ".join(c["plugin"] for c in p.chain) or "no effects"
            print(f"{p.name:<{width}}  {p.description}  [{chain}] ({where})")
        if not good:
            print(f"no presets found (shipped in {SHIPPED_DIR}, user presets in {user_dir()})")
    for msg in bad:
        print(f"musicbridge presets: error: {msg}", file=sys.stderr)
    return 2 if bad else 0
