"""A real headless Chromium for the panel tests: Debian's /usr/bin/chromium driven through Debian's
chromedriver by Selenium (nothing is downloaded: the driver path is given, Selenium Manager stays off)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "panel"
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _first(paths: tuple[str, ...], what: str) -> str:
    for p in paths:
        if os.path.exists(p):
            return p
    found = shutil.which(Path(paths[0]).name)
    if found:
        return found
    raise RuntimeError(f"{what} is not installed (Debian packages chromium and chromium-driver; "
                       "scripts/setup.sh installs them)")


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1800, extra: tuple[str, ...] = ()) -> Iterator[Any]:
    """A headless Chromium session, closed (and its processes reaped) however the block ends."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = _first(CHROMIUM, "chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},{height}", "--autoplay-policy=no-user-gesture-required",
              "--disable-background-networking", "--no-first-run", *extra):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(_first(DRIVER, "chromedriver")), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.05) -> Any:
    """`check()`'s first truthy value within `timeout` s; AssertionError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as e:  # noqa: BLE001 - the page is still building that element
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def attribute(browser, selector: str, name: str) -> str | None:
    """An attribute of the first element matching `selector`, read in one script call: the page
    redraws its cards on every update, so an element handle kept between calls goes stale."""
    return browser.execute_script("const e = document.querySelector(arguments[0]);"
                                  "return e && e.getAttribute(arguments[1]);", selector, name)


def replies(browser) -> list[str]:
    """The daemon's replies the page lists, newest first (read in one script call, as attribute())."""
    return browser.execute_script("return [...document.querySelectorAll('#replies li')].map(li => li.textContent);")


def panel_url(log_text: Callable[[], str], timeout: float = 60.0) -> str:
    """The panel URL the daemon logged at start."""
    return wait_until("the daemon logs its panel URL",
                      lambda: (m := re.search(r"panel: open (http://\S+) in a browser", log_text())) and m.group(1),
                      timeout)


def screenshot(driver, name: str) -> Path:
    """A PNG of the whole page into docs/panel/ (docs/panel.md shows them)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
