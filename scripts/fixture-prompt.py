#!/usr/bin/env python3
"""Prints a fixture prompt's token ids and its reference greedy continuation, comma-separated, one
line each: scripts/fixture-prompt.py DIR/expected.safetensors K. Standard library only (the device
machine and this one both have it)."""
import json
import struct
import sys


def read_tensor(path, name):
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        info = header[name]
        begin, end = info["data_offsets"]
        f.seek(8 + header_len + begin)
        raw = f.read(end - begin)
    fmt = {"I64": "q", "F32": "f"}[info["dtype"]]
    return struct.unpack("<%d%s" % (len(raw) // struct.calcsize(fmt), fmt), raw)


path, k = sys.argv[1], sys.argv[2]
print(",".join(str(v) for v in read_tensor(path, "prompt%s.input_ids" % k)))
print(",".join(str(v) for v in read_tensor(path, "prompt%s.greedy" % k)))
