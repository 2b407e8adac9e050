"""The package as `pip install .` makes it: the wheel holds every module, C source, preset and
DAW companion of the tree, and, installed into a fresh virtual environment, `musicbridge
tiny-model`, `generate` and `serve` run from it, with the C kernels built from its own sources.

The wheel is built from a copy of the working tree, so an old `build/` folder cannot leak stale
files into it and the tree itself is left untouched. The fresh environment gets the project
environment's site-packages through a .pth line for the dependencies only (torch and co. are
not installed again, nothing is downloaded); a path line in a .pth does not run that folder's own
.pth files, so the project's editable install (a finder hook) stays out, and the tests check that
every musicbridge module is imported from the fresh environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top-level folders of the tree that are not packages of the wheel.
NOT_SHIPPED = {"tests", "scripts", "docs", ".venv", ".git", "build", "dist", ".ci"}
DATA_ONLY = ("daw",)  # folders without __init__.py whose every file ships
TREE_IGNORE = {".venv", ".git", "build", "dist", ".pytest_cache", ".cache", "out"}
PROJECT_ENV = {"MUSICBRIDGE_KERNELS", "MUSICBRIDGE_LOADER", "MUSICBRIDGE_PRESETS", "MUSICBRIDGE_WEIGHT_CACHE",
               "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE"}

pytestmark = pytest.mark.timeout(900)


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, (f"{what} failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n"
                               f"--- stdout ---\n{r.stdout[-6000:]}\n--- stderr ---\n{r.stderr[-6000:]}")
    return r


def _copy_tree(dst: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith((".egg-info", ".pyc"))}
        if Path(folder) == ROOT:
            skip |= TREE_IGNORE & set(names)
        return skip

    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)
    return dst


def _package_roots(tree: Path) -> list[str]:
    return sorted(p.name for p in tree.iterdir()
                  if p.is_dir() and (p / "__init__.py").is_file() and p.name not in NOT_SHIPPED)


def _expected_files(tree: Path) -> set[str]:
    """What the wheel must hold, worked out from the tree: every .py of every top-level package,
    every .c/.h under model/ (subfolders too), the presets' .toml, the panel's page files and all of daw/."""
    want: set[str] = set()
    for top in _package_roots(tree):
        want |= {p.relative_to(tree).as_posix() for p in (tree / top).rglob("*.py") if "__pycache__" not in p.parts}
    for pattern in ("*.c", "*.h"):
        want |= {p.relative_to(tree).as_posix() for p in (tree / "model").rglob(pattern)}
    want |= {p.relative_to(tree).as_posix() for p in (tree / "presets").glob("*.toml")}
    want |= {p.relative_to(tree).as_posix() for p in (tree / "bridge" / "panel" / "static").glob("*") if p.is_file()}
    for top in DATA_ONLY:
        want |= {p.relative_to(tree).as_posix() for p in (tree / top).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    return want


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the tree copy it was built from)."""
    base = tmp_path_factory.mktemp("wheel")
    tree = _copy_tree(base / "src")
    out = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(out), str(tree)], "building the wheel (needs setuptools>=70.1, or setuptools and `wheel`, in this environment: make setup)",
         cwd=base, env=_clean_env(base))
    wheels = list(out.glob("musicbridge-*.whl"))
    assert len(wheels) == 1, f"expected one musicbridge wheel in {out}, found {wheels}"
    return wheels[0], tree


def _clean_env(base: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROJECT_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    env.update(extra)
    return env


class FreshEnv:
    def __init__(self, base: Path, wheel: Path):
        self.base = base
        self.venv = base / "venv"
        self.work = base / "work"  # every command's cwd: outside the repository
        self.work.mkdir()
        self.cache = base / "cache"
        _run([sys.executable, "-m", "venv", "--without-pip", str(self.venv)], "creating the fresh venv")
        self.python = self.venv / "bin" / "python"
        self.musicbridge = self.venv / "bin" / "musicbridge"
        # Installed before the dependencies become visible, so pip sees no other musicbridge.
        _run([sys.executable, "-m", "pip", "--python", str(self.python), "install", "--no-deps", "--no-index",
              str(wheel)], "pip install of the wheel into the fresh venv", cwd=self.work, env=self.env())
        self.site = Path(_run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              "asking the fresh venv for its site-packages", env=self.env()).stdout.strip())
        deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        (self.site / "_musicbridge_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))

    def env(self, **extra: str) -> dict[str, str]:
        return _clean_env(self.base, MUSICBRIDGE_CACHE=str(self.cache), HF_HOME=str(self.base / "hf"),
                          MUSICBRIDGE_PRESETS=str(self.base / "no-user-presets"), **extra)

    def run(self, args: list[str], what: str) -> subprocess.CompletedProcess:
        return _run(args, what, cwd=self.work, env=self.env(), timeout=600)


@pytest.fixture(scope="module")
def fresh(built, tmp_path_factory) -> FreshEnv:
    return FreshEnv(tmp_path_factory.mktemp("fresh"), built[0])


@pytest.fixture(scope="module")
def tiny(fresh) -> Path:
    out = fresh.work / "tiny"
    r = fresh.run([str(fresh.musicbridge), "tiny-model", str(out)], "installed `musicbridge tiny-model`")
    assert (out / "config.json").is_file(), r.stdout + r.stderr
    return out


def test_wheel_holds_the_tree(built):
    wheel, tree = built
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next((z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), "")
    want = _expected_files(tree)
    assert any(n.startswith("bridge/clock/") for n in want), "the tree copy lacks bridge/clock/"
    assert any(n.startswith("model/") and n.endswith(".c") for n in want), "the tree copy has no C sources"
    assert any(n.startswith("daw/") for n in want) and any(n.startswith("presets/") and n.endswith(".toml") for n in want)
    missing = sorted(want - names)
    assert not missing, f"{len(missing)} file(s) of the tree are not in {wheel.name}: {missing}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith(("tests/", "build/"))]
    assert "musicbridge = bridge.cli:run" in entry_points


def test_installed_modules_come_from_the_fresh_venv(fresh):
    r = fresh.run([str(fresh.python), "-c",
                   "import audiofile, bridge, bridge.clock, bridge.cli, model, model.kernels.gemv, plugin_host, presets, daw\n"
                   "for m in (audiofile, bridge, bridge.clock, bridge.cli, model, model.kernels.gemv, plugin_host, presets):\n"
                   "    print(m.__file__)\n"
                   "print(*daw.__path__)\n"
                   "print(*model.kernels.gemv.SOURCES, *model.kernels.gemv.HEADERS, sep='\\n')\n"
                   "print(presets.SHIPPED_DIR, presets.preset_files()['jazz_piano'])"],
                  "importing the installed packages")
    paths = [Path(p) for p in r.stdout.split()]
    assert paths, r.stderr
    outside = [p for p in paths if not p.resolve().is_relative_to(fresh.site.resolve())]
    assert not outside, f"imported from outside the fresh venv's {fresh.site} (the source tree leaks in?): {outside}"
    assert all(p.exists() for p in paths), [p for p in paths if not p.exists()]


def test_installed_generate_builds_the_kernels(fresh, tiny):
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler: the C kernels cannot be built here")
    out = fresh.work / "take.wav"
    r = fresh.run([str(fresh.musicbridge), "generate", "--model", str(tiny), "--prompt", "lofi drums",
                   "--seconds", "1", "--device", "cpu", "--dtype", "float32", "--seed", "1", "--out", str(out)],
                  "installed `musicbridge generate`")
    log = r.stdout + r.stderr
    assert out.is_file(), f"no {out}:\n{log}"
    from pedalboard.io import AudioFile

    with AudioFile(str(out)) as f:
        audio = f.read(f.frames)
    assert audio.size > 0 and float(abs(audio).max()) > 1e-4, f"the take is silent:\n{log}"

    built_libs = list((fresh.cache / "kernels").glob("*.so"))
    assert built_libs, f"generate built no C kernels into {fresh.cache / 'kernels'}:\n{log}"
    r = fresh.run([str(fresh.python), "-c",
                   "from model.kernels import gemv\n"
                   "print(gemv.available()); print(gemv.library_path())\n"
                   "print(*gemv.SOURCES, sep='\\n')"],
                  "loading the installed C kernels")
    lines = r.stdout.split()
    assert lines[0] == "True", f"gemv.available() is {lines[0]}:\n{r.stderr}"
    assert Path(lines[1]) in built_libs, (lines[1], built_libs)
    sources = [Path(p) for p in lines[2:]]
    assert sources and all(p.resolve().is_relative_to(fresh.site.resolve()) and p.is_file() for p in sources), sources


def test_installed_serve_answers_ping(fresh, tiny):
    from bridge.osc.udp import OscClient
    from tests.bridge.osc_helpers import free_udp_port

    port = free_udp_port()
    log_path = fresh.base / f"serve-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(fresh.musicbridge), "serve", "--model", str(tiny), "--device", "cpu", "--dtype", "float32",
             "--host", "127.0.0.1", "--port", str(port), "--session-dir", str(fresh.work / "session"),
             "--audio", "none"],
            cwd=fresh.work, env=fresh.env(),
            stdout=log, stderr=subprocess.STDOUT)
        try:
            with OscClient("127.0.0.1", port) as client:
                answered = False
                deadline = time.monotonic() + 300
                while not answered and time.monotonic() < deadline and proc.poll() is None:
                    client.send("/ping")
                    answered = client.wait_for(lambda a, _: a == "/pong", 0.5) is not None
            assert answered, f"installed `musicbridge serve` never answered /ping:\n{log_path.read_text()}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    assert rc == 0, f"serve exited {rc} on SIGTERM:\n{log_path.read_text()}"
