"""model.settings: every variable the engine reads, in one record; the command line applies it."""

from __future__ import annotations

from pathlib import Path

from model import settings
from model.settings import Settings


def test_the_environment_becomes_one_record():
    s = Settings.from_env({"MUSICBRIDGE_KERNELS": "float", "MUSICBRIDGE_MARCH": " x86-64-v3 ", "CC": "clang -v",
                           "MUSICBRIDGE_CROSS_FOLD": "0", "MUSICBRIDGE_CUDA_GRAPHS": "off",
                           "MUSICBRIDGE_CACHE": "/c", "HF_HOME": "/h", "TRANSFORMERS_OFFLINE": "1"})
    assert (s.kernels, s.march, s.compiler) == ("float", "x86-64-v3", ("clang", "-v"))
    assert not s.cross_fold and not s.cuda_graphs and s.hf_offline
    assert s.cache_dir == Path("/c") and s.hf_hub_cache == Path("/h/hub")
    d = Settings.from_env({"XDG_CACHE_HOME": "/x"})
    assert (d.kernels, d.march, d.compiler, d.cross_fold, d.hf_offline) == ("1", "native", (), True, False)
    assert d.cache_dir == Path("/x/musicbridge")


def test_applied_settings_hold_for_the_block_and_the_environment_is_not_read(monkeypatch):
    monkeypatch.setenv("MUSICBRIDGE_MARCH", "x86-64-v2")
    assert settings.current().march == "x86-64-v2"
    with settings.applied(Settings(march="armv8-a")):
        monkeypatch.setenv("MUSICBRIDGE_MARCH", "x86-64-v4")
        assert settings.current().march == "armv8-a"
    assert settings.current().march == "x86-64-v4"
