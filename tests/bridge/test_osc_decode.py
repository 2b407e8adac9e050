"""bridge.osc.udp.decode in-process: exact fit of every argument, bounded bundles, and a parse-only fuzz."""

from __future__ import annotations

import struct

import pytest

from bridge.osc.udp import MAX_BUNDLE_DEPTH, MAX_BUNDLE_ELEMENTS, OscDecodeError, decode, encode
from tests.bridge.hostile_packets import EVERY_TYPE, PING, bundle, corpus, fuzz_packets, raw_message


def test_round_trip_of_every_type():
    args = [1, -(2**31), 2**40, 2.5, "text", "", b"\x00\x01\x02", True, False, None]
    assert decode(encode("/a/b", args)) == [("/a/b", args)]
    assert decode(raw_message(b"/x", b",dm", struct.pack(">d", 0.1) + b"\x00\x90\x3c\x40")) == \
        [("/x", [0.1, (0, 0x90, 0x3C, 0x40)])]
    assert decode(b"/ping\0\0\0") == [("/ping", [])]  # no type tag string at all (OSC 1.0)


@pytest.mark.parametrize("tag", sorted(EVERY_TYPE))
def test_every_truncation_of_every_type_is_refused(tag):
    msg = EVERY_TYPE[tag]
    decode(msg)
    address_only = len(msg.split(b"\0", 1)[0]) // 4 * 4 + 4
    for n in range(len(msg)):
        if n == address_only:
            assert decode(msg[:n])[0][1] == []  # the address alone: a message without arguments
            continue
        with pytest.raises(OscDecodeError):
            decode(msg[:n])


def test_the_issue_truncated_float_is_refused():
    with pytest.raises(OscDecodeError, match="multiple of 4"):
        decode(encode("/transport/tempo", [120.0])[:25])
    with pytest.raises(OscDecodeError, match=r"argument 1 \(d\) needs 8 bytes"):
        decode(raw_message(b"/transport/tempo", b",d", b"\0\0\0\0"))


def test_negative_and_oversized_element_sizes():
    for size in (-4, -(2**31), 2**31 - 1, len(PING) + 4, 0, 5):
        with pytest.raises(OscDecodeError, match="declares"):
            decode(b"#bundle\0" + struct.pack(">Qi", 1, size) + PING)


def test_bundle_limits():
    nested = PING
    for _ in range(MAX_BUNDLE_DEPTH):
        nested = bundle(nested)
    assert decode(nested) == [("/ping", [])]
    with pytest.raises(OscDecodeError, match="nested more than"):
        decode(bundle(nested))
    assert len(decode(bundle(*[PING] * MAX_BUNDLE_ELEMENTS))) == MAX_BUNDLE_ELEMENTS
    with pytest.raises(OscDecodeError, match="more than 1024 elements"):
        decode(bundle(*[PING] * (MAX_BUNDLE_ELEMENTS + 1)))


def test_strings_must_be_terminated_padded_and_utf8():
    with pytest.raises(OscDecodeError, match="non-zero padding"):
        decode(b"/ping\0\x01\x01,\0\0\0")
    with pytest.raises(OscDecodeError, match="not NUL-terminated"):
        decode(raw_message(b"/x", b",s") + b"abcd")
    with pytest.raises(OscDecodeError, match="UTF-8"):
        decode(raw_message(b"/x", b",s", b"\xff\xfe\0\0"))
    with pytest.raises(OscDecodeError, match="no type tag accounts for"):
        decode(encode("/x", [1]) + b"\0\0\0\0")


def test_the_whole_corpus_is_refused_or_decoded_without_other_errors():
    for name, data in corpus():
        try:
            decode(data)
        except OscDecodeError:
            pass


def test_parse_only_fuzz_seed_7301_100k_packets():
    """Only OscDecodeError may come out of the decoder, for any bytes (replay: seed 7301)."""
    decoded = refused = 0
    for data in fuzz_packets(7301, 100_000):
        try:
            decode(data)
            decoded += 1
        except OscDecodeError:
            refused += 1
    assert decoded + refused == 100_000 and decoded > 1000 and refused > 1000
