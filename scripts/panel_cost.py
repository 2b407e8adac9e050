"""What the panel costs a jam: the jam's realtime factor with the panel open in a headless Chromium
against the same jam with `--panel off`, alternated runs on a JACK dummy server (BENCHMARKS.md).

    python scripts/panel_cost.py MODEL_DIR [--runs 3] [--seconds 40] [--dtype int8]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.bridge.osc_helpers import DaemonProcess  # noqa: E402
from tests.jack_server import jack_server  # noqa: E402
from tests.panel.browser import chromium, panel_url, wait_until  # noqa: E402


def one_run(model: str, panel: bool, seconds: float, dtype: str, base: Path) -> list[float]:
    presets = base / "presets"
    presets.mkdir(parents=True, exist_ok=True)
    d = DaemonProcess(Path(model), base / "session", presets, "--audio", "default", "--dtype", dtype,
                      "--panel", "127.0.0.1:0" if panel else "off")
    rtfs: list[float] = []
    try:
        with d.client() as c, contextlib.ExitStack() as stack:
            d.wait_ready(c, timeout=600)
            if panel:
                browser = stack.enter_context(chromium())
                browser.get(panel_url(d.log_text))
                wait_until("the panel connects", lambda: browser.find_element("id", "conn").text == "live")
            c.send("/transport/tempo", 120.0)
            c.send("/track/lead/prompt", "jazz piano")
            c.send("/jam/start", "lead")
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                r = c.receive(0.5)
                if r and r[0] == "/jam/chunk" and r[1][1] > 0:  # the first chunk includes the first prefill
                    rtfs.append(float(r[1][6]))
            c.send("/jam/stop", "lead")
            if panel:
                n = len(browser.find_elements("css selector", "[data-jam=lead] canvas[data-meter]"))
                assert n == 6, "the page did not show the jam's meters"
    finally:
        d.stop()
    return rtfs  # seconds each chunk took to generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--dtype", default="int8")
    a = ap.parse_args()
    chunk = 4.0  # 2 bars at 120 bpm in 4/4
    out: dict[bool, list[float]] = {False: [], True: []}
    with jack_server(rate=48000, period=256), tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            for panel in (False, True):
                gen = one_run(a.model, panel, a.seconds, a.dtype, Path(tmp) / f"{i}-{panel}")
                rtf = statistics.median(chunk / g for g in gen) if gen else float("nan")
                out[panel].append(rtf)
                print(f"run {i + 1} panel {'open' if panel else 'off '}: {len(gen)} chunks, median realtime factor "
                      f"{rtf:.3f}", flush=True)
    for panel in (False, True):
        v = out[panel]
        print(f"panel {'open' if panel else 'off '}: median {statistics.median(v):.3f}, range {min(v):.3f}-{max(v):.3f}")


if __name__ == "__main__":
    main()
