"""Malformed OSC datagrams: a named corpus of known attacks, a seeded structure-aware fuzzer, and
every address docs/osc.md documents with example arguments (so a new address is covered by the
reply budget and fuzz tests as soon as it is documented)."""

from __future__ import annotations

import random
import re
import struct
from pathlib import Path
from typing import Any

from bridge.osc.udp import encode

DOC = Path(__file__).resolve().parents[2] / "docs" / "osc.md"

MAX_UDP = 65507


def bundle(*elements: bytes, timetag: int = 1) -> bytes:
    return b"#bundle\0" + struct.pack(">Q", timetag) + b"".join(struct.pack(">i", len(e)) + e for e in elements)


def osc_string(s: bytes) -> bytes:
    s += b"\0"
    return s + b"\0" * (-len(s) % 4)


def raw_message(address: bytes, tags: bytes, payload: bytes = b"") -> bytes:
    return osc_string(address) + osc_string(tags) + payload


PING = encode("/ping")

# One valid message per type tag, for truncation at every length.
EVERY_TYPE = {
    "i": encode("/transport/tempo", [120]),
    "h": encode("/track/t/param", ["seed", 2**40]),
    "f": encode("/transport/tempo", [120.0]),
    "d": raw_message(b"/transport/tempo", b",d", struct.pack(">d", 120.0)),
    "s": encode("/track/t/prompt", ["a warm pad"]),
    "b": encode("/track/t/melody/chroma", [b"\0" * 48, 7.8125]),
    "m": raw_message(b"/track/t/prompt", b",m", b"\x00\x90\x3c\x40"),
    "TFN": raw_message(b"/track/t/param", b",sT", osc_string(b"greedy")),
}


def corpus() -> list[tuple[str, bytes]]:
    """(name, datagram) for every case issue #13 lists, and a few more."""
    cases: list[tuple[str, bytes]] = [
        ("empty packet", b""),
        ("one byte", b"/"),
        ("not OSC", b"garbage that is not OSC!"),
        ("negative element size (the 24-byte hang)",
         b"#bundle\0" + struct.pack(">Qi", 1, -4) + b"/ping\0\0\0,\0\0\0"),
        ("element size -2**31", b"#bundle\0" + struct.pack(">Qi", 1, -(2**31)) + PING),
        ("element size past the end", b"#bundle\0" + struct.pack(">Qi", 1, len(PING) + 4) + PING),
        ("element size 2**31-1", b"#bundle\0" + struct.pack(">Qi", 1, 2**31 - 1) + PING),
        ("element size not a multiple of 4", b"#bundle\0" + struct.pack(">Qi", 1, 5) + PING[:8]),
        ("zero-size element", b"#bundle\0" + struct.pack(">Qi", 1, 0) + PING),
        ("bundle header only, truncated", b"#bundle\0\0\0\0\0"),
        ("10,000 zero-size elements", b"#bundle\0" + struct.pack(">Q", 1) + struct.pack(">i", 0) * 10_000),
        ("8,000 minimal messages", bundle(*([b"/a\0\0"] * 8_000))),
        ("1,025 pings (one over the element limit)", bundle(*([PING] * 1025))),
        ("blob size negative", raw_message(b"/track/t/melody/chroma", b",bf", struct.pack(">i", -48))),
        ("blob size 2**31-1", raw_message(b"/track/t/melody/chroma", b",b", struct.pack(">i", 2**31 - 1))),
        ("blob past the end", raw_message(b"/track/t/melody/chroma", b",b", struct.pack(">i", 64) + b"\0" * 48)),
        ("more tags than arguments", raw_message(b"/transport/tempo", b",fff", struct.pack(">f", 120.0))),
        ("fewer tags than arguments", raw_message(b"/transport/tempo", b",", struct.pack(">f", 120.0))),
        ("tags without comma", raw_message(b"/transport/tempo", b"f", struct.pack(">f", 120.0))),
        ("unsupported tag S", raw_message(b"/track/t/prompt", b",S", osc_string(b"pad"))),
        ("unsupported tag c", raw_message(b"/track/t/prompt", b",c", b"\0\0\0A")),
        ("array tags", raw_message(b"/track/t/prompt", b",[s]", osc_string(b"pad"))),
        ("timetag tag", raw_message(b"/transport/tempo", b",t", b"\0" * 8)),
        ("wrong type for the address", encode("/transport/tempo", ["fast"])),
        ("int where a string is expected", encode("/track/t/prompt", [3])),
        ("address not terminated", b"/ping"[:4] * 16),
        ("tag string not terminated", b"/ping\0\0\0,iiii"),
        ("non-zero string padding", b"/ping\0\x01\x01\x01,\0\0\0"),
        ("address without slash", encode("/ping")[1:] + b"\0\0\0"),
        ("non-UTF-8 address", b"/\xff\xfe\0,\0\0\0"),
        ("non-UTF-8 string", raw_message(b"/track/t/prompt", b",s", b"\xff\xfe\xfd\0")),
        ("60,000-character prompt", encode("/track/t/prompt", ["x" * 60_000])),
        ("60,000-byte address", osc_string(b"/" + b"a" * 60_000) + b",\0\0\0"),
        ("string with no NUL inside the packet", raw_message(b"/track/t/prompt", b",s") + b"abcd" * 1000),
        ("60,000-byte blob", encode("/track/t/melody/chroma", [b"\0" * 60_000, 7.8125])),
        ("3,000 notes, over the 2,048 limit", encode("/track/t/melody/notes", [60, 0.0, 1.0] * 3000)),
        ("NaN tempo", encode("/transport/tempo", [float("nan")])),
    ]
    deep = PING
    for _ in range(100):
        deep = bundle(deep)
    cases.append(("bundles nested 100 deep", deep))
    very_deep = PING
    while len(very_deep) + 20 < MAX_UDP:
        very_deep = bundle(very_deep)
    cases.append((f"bundles nested {(len(very_deep) - len(PING)) // 20} deep", very_deep))
    for tag, msg in EVERY_TYPE.items():
        for n in range(len(msg)):
            cases.append((f"truncated {tag} argument: {n} of {len(msg)} bytes", msg[:n]))
    cases.append(("the issue's 25 of 28 bytes of /transport/tempo f 120", encode("/transport/tempo", [120.0])[:25]))
    for name, data in cases:
        assert len(data) <= MAX_UDP, name
    return cases


SEEDS = [
    encode("/ping"), encode("/status"), encode("/tracks"), encode("/track/fz/state"),
    encode("/track/fz/prompt", ["pad"]), encode("/transport/tempo", [128.0]),
    encode("/transport/signature", [3, 4]), encode("/track/fz/param", ["top_k", 50]),
    encode("/track/fz/melody/chroma", [b"\x00" * 96, 7.8125]),
    encode("/track/fz/melody/notes", [60, 0.0, 1.0]), encode("/track/fz/generate", [2.0]),
    encode("/job/1/cancel"), encode("/job/1/status"), encode("/transport/play", [0.0]),
    bundle(encode("/ping"), encode("/status")), bundle(bundle(encode("/tracks"))),
    raw_message(b"/transport/tempo", b",d", struct.pack(">d", 120.0)),
    raw_message(b"/track/fz/param", b",sT", osc_string(b"greedy")),
]


def mutate(rng: random.Random, data: bytes, nested: bool = False) -> bytes:
    """One structure-aware mutation: bytes, sizes, tags, truncation, splicing, wrapping."""
    b = bytearray(data)
    op = rng.randrange(10)
    if nested and op == 8:
        op = 0
    if op == 0 and b:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 1:  # truncate
        del b[rng.randint(0, len(b)):]
    elif op == 2 and len(b) >= 4:  # overwrite an aligned 32-bit word with a boundary value (sizes, counts)
        i = rng.randrange(len(b) // 4) * 4
        b[i:i + 4] = struct.pack(">i", rng.choice([-1, -4, -(2**31), 2**31 - 1, 0, 4, len(b), len(b) + 4,
                                                    rng.randint(-(2**31), 2**31 - 1)]))
    elif op == 3:  # replace or extend the type tags
        i = b.find(b",")
        if i >= 0:
            for k in range(i + 1, min(len(b), i + 1 + rng.randint(1, 6))):
                b[k] = ord(rng.choice("ihfdsbTFNmSc[]t\0"))
    elif op == 4:  # insert random bytes
        i = rng.randint(0, len(b))
        b[i:i] = rng.randbytes(rng.choice([1, 2, 3, 4, 8]))
    elif op == 5:  # splice two seeds
        other = rng.choice(SEEDS)
        b = b[: rng.randint(0, len(b))] + other[rng.randint(0, len(other)):]
    elif op == 6:  # wrap in a bundle, maybe with a lying size
        inner = bytes(b)
        size = len(inner) if rng.random() < 0.5 else rng.choice([-4, len(inner) + 4, len(inner) - 4, 0])
        b = bytearray(b"#bundle\0" + struct.pack(">Qi", 1, size) + inner)
    elif op == 7:  # duplicate a slice
        i, j = sorted(rng.randint(0, len(b)) for _ in range(2))
        b[j:j] = b[i:j][:4096]
    elif op == 8:  # a bundle of many mutated elements
        parts = [mutate(rng, rng.choice(SEEDS), True) for _ in range(rng.randint(2, 40))]
        return bundle(*[p + b"\0" * (-len(p) % 4) for p in parts])[:MAX_UDP]
    else:  # zero padding changes
        b += b"\0" * rng.choice([1, 2, 3, 4, 8])
    return bytes(b[:MAX_UDP])


def fuzz_packets(seed: int, count: int):
    """`count` datagrams: 3 in 4 structure-aware mutations of valid messages, 1 in 4 random bytes."""
    rng = random.Random(seed)
    for i in range(count):
        if i % 4 == 3:
            yield rng.randbytes(rng.choice([rng.randint(0, 64), rng.randint(0, 1500)]))
        else:
            data = rng.choice(SEEDS)
            for _ in range(rng.randint(1, 3)):
                data = mutate(rng, data)
            yield data


# ---------------------------------------------------------------- every documented address

# Example values by the argument names docs/osc.md uses; a name not listed gets its type's default,
# so a newly documented address is still sent (perhaps refused `bad_args`, which is measured too).
EXAMPLE_VALUES: dict[str, Any] = {
    "bpm": 120.0, "seconds": 1.0, "numerator": 3, "denominator": 4, "pitch": 60, "velocity": 100,
    "start_beat": 0.0, "length_beats": 1.0, "frame_rate": 7.8125, "channel": 2, "quarter_notes": 0.0,
    "text": "lofi drums", "name": "plain", "key": "top_k", "value": 50, "cookie": "0" * 32,
    "chroma": bytes(48 * 8), "priority": 0, "reason": "interrupted", "bars": 2,
}
TYPE_DEFAULTS: dict[str, Any] = {"i": 1, "h": 1, "f": 1.0, "d": 1.0, "s": "x", "b": bytes(48)}


def documented_addresses(doc: Path = DOC) -> list[tuple[str, str]]:
    """(address, argument spec) for every address docs/osc.md documents: each `/...` in a heading of
    its "Addresses" part (several per heading) and in the first column of its tables there (the DAW
    feedback the daemon reads)."""
    text = doc.read_text(encoding="utf-8")
    start = text.index("\n## Addresses")
    end = text.index("\n## ", start + 1)
    found: list[tuple[str, str]] = []
    for line in text[start:end].splitlines():
        line = line.replace("\\|", "\0")  # an escaped | inside a table cell is not a column
        if line.startswith("### "):
            codes = re.findall(r"`([^`]+)`", line)
        elif line.startswith("| `/"):
            codes = re.findall(r"`([^`]+)`", line.split("|")[1])
        else:
            continue
        for code in codes:
            address, _, spec = code.replace("\0", "|").partition(" ")
            if address.startswith("/"):
                found.append((address, spec))
    return found


def example_args(spec: str, names: dict[str, Any] | None = None) -> list[Any]:
    """Arguments for a documented spec such as `f:seconds | i:bars s:"bars" [i:priority]`: the first
    alternative, optional parts left out, one group of a repeated `(...)...`, quoted literals as they
    are, numbers given as values (`f:1|0`), names from `names` or EXAMPLE_VALUES, else by type."""
    spec = re.sub(r"\[[^\]]*\]", "", spec.split(" | ")[0]).replace(")...", "").replace("(", "").replace(")", "")
    args: list[Any] = []
    for kind, name in re.findall(r'([a-z|]+):("[^"]*"|\S+)', spec):
        kind = kind.split("|")[0]
        if name.startswith('"'):
            args.append(name.strip('"'))
            continue
        literal = name.split("|")[0]
        if re.fullmatch(r"-?\d+(\.\d+)?", literal):
            args.append(int(float(literal)) if kind in "ih" else float(literal))
        elif names is not None and name in names:
            args.append(names[name])
        elif name in EXAMPLE_VALUES and type(EXAMPLE_VALUES[name]) is type(TYPE_DEFAULTS.get(kind, "")):
            args.append(EXAMPLE_VALUES[name])
        else:
            args.append(TYPE_DEFAULTS.get(kind, "x"))
    return args


def malformed_args(args: list[Any]) -> list[list[Any]]:
    """Wrong forms of a valid argument list: none at all, one too many, and every argument's type swapped."""
    swapped = [7 if isinstance(a, (str, bytes)) else "seven" for a in args]
    forms = [[], [*args, "extra"], swapped]
    return [f for f in forms if f != args]


def truncated(datagram: bytes) -> bytes:
    """The datagram cut short inside its last argument (no longer a multiple of 4 bytes)."""
    return datagram[:-3] if len(datagram) > 4 else datagram + b"\0"


# ---------------------------------------------------------------- fuzzing every documented address

TRACK_NAMES = ["fz", "fz2", "lead", "a" * 32, "a" * 33, "evil\n", "bad name", "²", "", "trk\0x", "Ａ"]
NASTY_STRINGS = ["", "x" * 1024, "x" * 1025, "²", "5.1.00", "9999999.1.00", "005|01|0000", "²|1|0", "3 / 4",
                 "bars", "seconds", "at", "variations", "temperature", "seed", "top_k", "/etc/passwd",
                 "../../x.wav", "\n", "\0", "NaN", "1e309", "-1"]
NASTY_NUMBERS = [0, -1, 1, 16, 17, 2**31 - 1, -(2**31), 2**40, 0.0, -0.0, 1e-10, 1e-9, 1e7, 4e7, 1e30,
                 float("nan"), float("inf"), float("-inf"), 20.0, 10.0, 1000.0, 1000.5, 7.8125]


def _nasty_arg(rng: random.Random) -> Any:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice(NASTY_STRINGS)
    if kind == 1:
        v = rng.choice(NASTY_NUMBERS)
        return float(v) if rng.random() < 0.5 and not isinstance(v, float) and abs(v) < 2**31 else v
    if kind == 2:
        return rng.randbytes(rng.choice([0, 1, 48, 47, 96, 4800, 60_000, 60_001]))
    if kind == 3:
        return rng.choice([True, False, None])
    return rng.randint(-(2**31), 2**31 - 1)


def documented_message(rng: random.Random, addresses: list[tuple[str, str]]) -> bytes:
    """One message to a documented address: its example arguments, or some of them replaced by
    nasty values of any type, or a huge count of arguments; names and job ids hostile at times."""
    template, spec = rng.choice(addresses)
    address = template.replace("<name>", rng.choice(TRACK_NAMES) if rng.random() < 0.3 else "fz")
    address = address.replace("<id>", rng.choice(["1", "2", "²", "0", "99999999999999", "-1", "1a"]))
    args = example_args(spec, {"track": rng.choice(TRACK_NAMES[:3])})
    how = rng.randrange(4)
    if how == 1:
        args = [_nasty_arg(rng) if rng.random() < 0.5 else a for a in args] or [_nasty_arg(rng)]
    elif how == 2:
        args = [_nasty_arg(rng) for _ in range(rng.randint(0, 6))]
    elif how == 3:  # a huge count of arguments
        one = args or [60]
        args = (one * (rng.choice([700, 2049, 3000]) // len(one) + 1))[:rng.choice([700, 2049, 3000])]
    try:
        data = encode(address, args)
    except Exception:  # noqa: BLE001 - an address python-osc cannot encode: send the raw form
        data = raw_message(address.encode("utf-8", "replace").replace(b"\0", b"0"), b",")
    return data[:MAX_UDP]


def documented_fuzz(seed: int, count: int, addresses: list[tuple[str, str]] | None = None):
    """`count` datagrams over every documented address: messages (half of them mutated by `mutate`),
    bundles of up to 40 of them, bundles nested up to 6 deep (4 is the limit), and floods: bundles
    of up to 1024 copies of one message."""
    rng = random.Random(seed)
    addresses = addresses or documented_addresses()
    for _ in range(count):
        shape = rng.randrange(10)
        if shape < 5:
            data = documented_message(rng, addresses)
            yield mutate(rng, data) if shape < 2 else data
        elif shape < 8:
            parts = [documented_message(rng, addresses) for _ in range(rng.randint(1, 40))]
            data = bundle(*parts)
            for _ in range(rng.choice([0, 0, 1, 3, 5])):
                data = bundle(data)
            yield data[:MAX_UDP]
        else:
            one = documented_message(rng, addresses)
            copies = min(1024, (MAX_UDP - 16) // (len(one) + 4))
            yield bundle(*[one] * rng.randint(1, max(1, copies)))[:MAX_UDP]
