"""Effect chains built from preset entries, and block-wise processing that keeps plugin state."""

from __future__ import annotations

import numpy as np
import pedalboard
import pytest

from plugin_host.chain import ChainError, build_chain, builtin_plugins, process_chunks

SR = 32000


def noise(seconds: float = 1.0, channels: int = 2, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((channels, int(SR * seconds))) * 0.2).astype(np.float32)


def test_builds_builtin_plugins_with_parameters():
    chain = build_chain([
        {"plugin": "HighpassFilter", "cutoff_frequency_hz": 80},
        {"plugin": "LadderFilter", "mode": "LPF24", "cutoff_hz": 900.0},
        {"plugin": "Reverb", "room_size": 0.4, "freeze_mode": 0.0},
    ])
    assert isinstance(chain, pedalboard.Pedalboard)
    assert [type(p).__name__ for p in chain] == ["HighpassFilter", "LadderFilter", "Reverb"]
    assert chain[0].cutoff_frequency_hz == pytest.approx(80.0)
    assert chain[1].mode == pedalboard.LadderFilter.Mode.LPF24
    assert chain[2].room_size == pytest.approx(0.4)
    assert build_chain([]).__len__() == 0


def test_containers_and_file_based_plugins_are_not_offered():
    names = builtin_plugins()
    assert "Reverb" in names and "Compressor" in names
    for hidden in ("Pedalboard", "Chain", "Mix", "VST3Plugin", "Convolution", "Plugin"):
        assert hidden not in names


@pytest.mark.parametrize("specs, expected", [
    ([{"plugin": "Nope"}], r"chain\[0\]\.plugin: unknown plugin 'Nope'.*Reverb"),
    ([{"room_size": 0.3}], r"chain\[0\]\.plugin: expected a plugin name"),
    ([{"plugin": "Gain"}, {"plugin": "Reverb", "room": 1}], r"chain\[1\]\.room: Reverb has no parameter 'room'.*room_size"),
    ([{"plugin": "Reverb", "room_size": 3.0}], r"chain\[0\]\.room_size: Reverb rejected 3\.0"),
    ([{"plugin": "Reverb", "room_size": "big"}], r"chain\[0\]\.room_size: expected a finite number, got 'big'"),
    ([{"plugin": "Reverb", "room_size": float("nan")}], r"chain\[0\]\.room_size: expected a finite number"),
    ([{"plugin": "Reverb", "room_size": True}], r"chain\[0\]\.room_size: expected a finite number"),
    ([{"plugin": "LadderFilter", "mode": "LPF99"}], r"chain\[0\]\.mode: expected one of .*LPF24"),
    (["Reverb"], r"chain\[0\]: expected a table"),
    ({"plugin": "Reverb"}, r"chain: expected a list"),
    ([{"plugin": "vst3"}], r"chain\[0\]\.path: expected the path of a \.vst3"),
    ([{"plugin": "vst3", "path": "/nowhere/Plug.vst3"}], r"chain\[0\]\.path: VST3 plugin /nowhere/Plug\.vst3 does not exist"),
    ([{"plugin": "vst3", "path": "/x.vst3", "gain": 1}], r"chain\[0\]\.gain: unknown key for a vst3 entry"),
])
def test_bad_entries_name_the_entry_key_and_expectation(specs, expected):
    with pytest.raises(ChainError, match=expected):
        build_chain(specs)


def test_vst3_file_that_is_not_a_plugin_is_a_chain_error(tmp_path):
    fake = tmp_path / "Fake.vst3"
    fake.write_bytes(b"not a plugin")
    with pytest.raises(ChainError, match=r"chain\[0\]: cannot load VST3 .*Fake\.vst3"):
        build_chain([{"plugin": "vst3", "path": str(fake), "params": {"mix": 0.5}}])


def test_block_processing_equals_one_pass_and_keeps_state():
    specs = [{"plugin": "Reverb", "room_size": 0.8}, {"plugin": "Compressor", "threshold_db": -20},
             {"plugin": "Delay", "delay_seconds": 0.05, "feedback": 0.4, "mix": 0.5}]
    x = noise(1.0)
    whole = np.asarray(build_chain(specs)(x, SR), dtype=np.float32)
    chain = build_chain(specs)
    blocks = process_chunks(chain, x, SR, block=1000)
    assert blocks.shape == x.shape and blocks.dtype == np.float32
    np.testing.assert_array_equal(blocks, whole)
    # Resetting each block would lose the reverb/delay tails between blocks.
    reset_each = np.concatenate([np.asarray(build_chain(specs)(x[:, i:i + 1000], SR)) for i in range(0, x.shape[1], 1000)], axis=1)
    assert np.abs(reset_each - whole).max() > 1e-3


def test_first_block_resets_state_from_an_earlier_use():
    chain = build_chain([{"plugin": "Reverb", "room_size": 0.9}])
    x = noise(0.5, seed=1)
    first = process_chunks(chain, x, SR, block=4096)
    process_chunks(chain, noise(0.5, seed=2), SR, block=4096)
    again = process_chunks(chain, x, SR, block=4096)
    np.testing.assert_array_equal(first, again)


def test_process_chunks_rejects_bad_shapes():
    chain = build_chain([{"plugin": "Gain", "gain_db": -6}])
    with pytest.raises(ValueError, match="channels, samples"):
        process_chunks(chain, np.zeros(100, np.float32), SR)
    with pytest.raises(ValueError, match="block"):
        process_chunks(chain, np.zeros((1, 100), np.float32), SR, block=0)
