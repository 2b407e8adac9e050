"""Malformed OSC datagrams: a named corpus of known attacks and a seeded structure-aware fuzzer."""

from __future__ import annotations

import random
import struct

from bridge.osc.udp import encode

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
