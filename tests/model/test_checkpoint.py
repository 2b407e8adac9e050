"""Our checkpoint reader (model/load/checkpoint.py): the file, the tokenizer, the engine it feeds, and
`musicbridge generate` running without importing `transformers`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.types import CheckpointError
from model.load.checkpoint import Checkpoint, TextTokenizer, read_safetensors, unsupported
from model.engine import Engine
from model.types import GenerationRequest, SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def test_safetensors_read_equals_the_safetensors_library_and_shares_the_page_cache(tiny_model_dir):
    from safetensors.torch import load_file

    path = Path(tiny_model_dir) / "model.safetensors"
    ours, theirs = read_safetensors(path), load_file(str(path))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    before = path.read_bytes()
    next(iter(ours.values())).add_(1.0)  # a private mapping: writes never reach the file
    assert path.read_bytes() == before


@pytest.mark.parametrize("damage", ["short", "header", "range"])
def test_a_damaged_safetensors_file_is_named_with_what_is_wrong(tmp_path, tiny_model_dir, damage):
    src = (Path(tiny_model_dir) / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    if damage == "short":
        bad.write_bytes(src[:5])
        words = "shorter than its 8-byte header size"
    elif damage == "header":
        bad.write_bytes((10**9).to_bytes(8, "little") + src[8:100])
        words = "header size"
    else:
        bad.write_bytes(src[: len(src) // 2])
        words = "does not fit its byte range"
    with pytest.raises(CheckpointError, match=words) as e:
        read_safetensors(bad)
    assert str(bad) in str(e.value)


def test_tokenizer_gives_transformers_ids_and_masks(tiny_model_dir):
    from transformers import AutoTokenizer

    prompts = ["lofi hip hop beat, warm piano!", "techno", "", "Ünïcödé  jazz   with    spaces", "a b c d e f"]
    ours = TextTokenizer(Path(tiny_model_dir))(prompts, return_tensors="pt", padding=True)
    theirs = AutoTokenizer.from_pretrained(tiny_model_dir)(prompts, return_tensors="pt", padding=True)
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours.attention_mask, theirs.attention_mask)


def test_engine_reads_text_checkpoints_itself_and_melody_ones_through_transformers(tiny_engine, tiny_melody_engine):
    assert isinstance(tiny_engine.hf, Checkpoint)
    assert not isinstance(tiny_melody_engine.hf, Checkpoint)


def test_what_the_reader_leaves_to_transformers_is_said(tmp_path, tiny_model_dir, monkeypatch):
    assert unsupported(Path(tiny_model_dir)) is None
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "tokenizer.json").unlink()
    assert unsupported(folder) == "no tokenizer.json"
    monkeypatch.setenv("MUSICBRIDGE_LOADER", "transformers")
    assert unsupported(Path(tiny_model_dir)) == "MUSICBRIDGE_LOADER=transformers"
    eng = Engine.load(str(tiny_model_dir), device="cpu", dtype="float32")
    assert not isinstance(eng.hf, Checkpoint)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_both_loaders_generate_the_same_take(tiny_model_dir, monkeypatch, dtype):
    """Same seed, same sampling: the same codes and audio whichever loader read the folder."""
    req = [GenerationRequest("warm lofi piano", 1.0, SamplingParams(seed=11))]
    ours = Engine.load(str(tiny_model_dir), device="cpu", dtype=dtype)
    monkeypatch.setenv("MUSICBRIDGE_LOADER", "transformers")
    theirs = Engine.load(str(tiny_model_dir), device="cpu", dtype=dtype)
    a, b = ours.generate_tokens(req)[0], theirs.generate_tokens(req)[0]
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) > 4
    wa, wb = ours.decode(a), theirs.decode(a)
    assert np.abs(wa - wb).max() <= 1e-5 * np.abs(wb).max()


def test_continuation_encodes_through_transformers_codec_built_from_the_same_tensors(tiny_model_dir, monkeypatch):
    t = np.arange(16000) / 32000
    tone = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)[None]
    ours = Engine.load(str(tiny_model_dir), device="cpu", dtype="float32").encode(tone)
    monkeypatch.setenv("MUSICBRIDGE_LOADER", "transformers")
    theirs = Engine.load(str(tiny_model_dir), device="cpu", dtype="float32").encode(tone)
    np.testing.assert_array_equal(ours, theirs)


def test_a_missing_decoder_tensor_is_a_clear_error(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    from model.load.resolve import ModelError

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["decoder.model.decoder.layers.1.fc2.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises((ModelError, CheckpointError), match="decoder.model.decoder.layers.1.fc2.weight"):
        Engine.load(str(folder), device="cpu", dtype="float32")


def test_generate_runs_without_importing_transformers(tiny_model_dir, tmp_path):
    """What the user's command imports: `musicbridge generate` on a text checkpoint never
    imports transformers (2.5-3.3 s of a run)."""
    out = tmp_path / "take.wav"
    code = ("import sys; from bridge.cli import main; "
            f"rc = main(['generate', '--model', {str(tiny_model_dir)!r}, '--prompt', 'lofi', '--seconds', '1', "
            f"'--seed', '3', '--out', {str(out)!r}]); "
            "print('RC', rc, 'transformers' in sys.modules, 'torch._dynamo' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MUSICBRIDGE_LOADER", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert "RC 0 False False" in res.stdout, res.stdout + res.stderr
    assert out.exists() and out.stat().st_size > 32000


def test_sharded_checkpoints_are_read_through_their_index(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(folder / f), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    ck = Checkpoint.load(folder)
    assert set(ck.tensors) == set(tensors)
    req = [GenerationRequest("techno", 0.5, SamplingParams(greedy=True))]
    a = Engine.load(str(folder), device="cpu", dtype="float32").generate_tokens(req)[0]
    b = Engine.load(str(tiny_model_dir), device="cpu", dtype="float32").generate_tokens(req)[0]
    np.testing.assert_array_equal(a, b)


def _header_file(tmp_path: Path, header) -> Path:
    body = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body + bytes(64))
    return path


@pytest.mark.parametrize("header, words", [
    ([1, 2], "not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "whole numbers, 0 or more"),
    ({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, "whole numbers, 0 or more"),
    ({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, "dtype 'F8_E4M3'; supported: F64"),
    ({"w": {"shape": [2], "data_offsets": [0, 8]}}, "malformed header entry"),
])
def test_a_malformed_header_names_the_tensor_and_the_problem(tmp_path, header, words):
    with pytest.raises(CheckpointError, match=words):
        read_safetensors(_header_file(tmp_path, header))


def test_a_broken_tokenizer_json_is_named(tmp_path, tiny_model_dir):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot read as a tokenizer"):
        TextTokenizer(folder)


def test_a_config_that_does_not_match_the_tensors_is_refused_before_any_step(tmp_path, tiny_model_dir):
    """The C step trusts the config's widths; a config.json from another model must not reach it."""
    from model.load.resolve import ModelError

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["decoder"]["ffn_dim"] = 2 * cfg["decoder"]["ffn_dim"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ModelError, CheckpointError), match=r"fc1.weight is \(64, 32\), but config.json"):
        Engine.load(str(folder), device="cpu", dtype="float32")


def test_a_codec_config_the_reader_does_not_implement_goes_to_transformers(tmp_path, tiny_model_dir):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["audio_encoder"]["norm_type"] = "time_group_norm"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert "norm_type='time_group_norm' is not supported" in unsupported(folder)


def test_pages_are_given_back_for_a_checkpoint_linked_from_the_hub_cache(tmp_path, tiny_model_dir):
    """The Hugging Face cache links model.safetensors to a blob named by its hash: the mapping's
    name does not end in .safetensors, and the pages must still go back."""
    from model.memory.pages import drop_pages

    snap, blobs = tmp_path / "snapshots" / "abc", tmp_path / "blobs"
    shutil.copytree(tiny_model_dir, snap)
    blobs.mkdir()
    (snap / "model.safetensors").rename(blobs / "5d41402abc4b2a76b9719d911017c592")
    (snap / "model.safetensors").symlink_to(blobs / "5d41402abc4b2a76b9719d911017c592")
    ck = Checkpoint.load(snap)
    table = ck.tensors["text_encoder.shared.weight"]
    assert float(table.abs().sum()) > 0  # read: its pages are resident
    assert drop_pages([table]) >= table.numel() * table.element_size() - 2 * 4096
    assert drop_pages([torch.ones(1 << 16)]) == 0  # heap memory is never touched
