"""Command-line typing for `musicbridge send` and the address checks of `musicbridge serve`."""

from __future__ import annotations

import argparse

import pytest

from bridge.cli import main
from bridge.commands.common import UsageError
from bridge.commands.send import format_reply, parse_arg
from bridge.commands.serve import _is_loopback, host_port


def test_send_arguments_are_typed_by_look_or_prefix(tmp_path):
    blob = tmp_path / "c.bin"
    blob.write_bytes(b"\x01\x02")
    assert [parse_arg(a) for a in ["3", "2.5", "drums", "nan", "i:0x10", "f:4", "s:120", "T:", "F:", "N:",
                                   f"b:@{blob}", "b:0x00ff", "x:y"]] == \
        [3, 2.5, "drums", "nan", 16, 4.0, "120", True, False, None, b"\x01\x02", b"\x00\xff", "x:y"]
    for bad in ["i:three", "f:", "b:nothing", "b:0xZZ"]:
        with pytest.raises(UsageError):
            parse_arg(bad)


def test_replies_print_one_line_each():
    assert format_reply("/job/done", [3, "/tmp/a b.wav"]) == "/job/done 3 '/tmp/a b.wav'"
    assert format_reply("/x", [0.5, b"\x00" * 4, True]) == "/x 0.5 <blob 4 bytes> True"


def test_send_refuses_bad_input_with_exit_2(capsys):
    assert main(["send", "ping"]) == 2
    assert "must start with '/'" in capsys.readouterr().err
    assert main(["send", "/ping", "--wait-reply", "nan"]) == 2


def test_serve_address_checks():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5")
    assert host_port("127.0.0.1:9011") == ("127.0.0.1", 9011)
    assert host_port("[::1]:9011") == ("::1", 9011)
    for bad in ["9011", "host:", "host:70000", ":9011"]:
        with pytest.raises(argparse.ArgumentTypeError):
            host_port(bad)


def test_serve_refuses_a_broken_session_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "session.json").write_text("{broken")
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--session-dir", str(tmp_path),
                 "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "session.json" in err and "move it away" in err
    assert main(["serve", "--allow-dir", str(tmp_path / "missing"), "--session-dir", str(tmp_path)]) == 2
    assert "--allow-dir" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use_before_loading_the_model(tmp_path, capsys):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path / "no-model"), "--session-dir", str(tmp_path),
                     "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "no-model" not in err
