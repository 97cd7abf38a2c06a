"""Read an offline W&B run file (``run-*.wandb``) back into protobuf records, for tests.

The file is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each with a
7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a ``Record`` protobuf.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list:
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        pending += raw[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def summarize(path: Path) -> dict:
    """The run's id, group, name, flattened config and the history keys it logged."""
    out = {"config": {}, "history_keys": set(), "history": []}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(run_id=record.run.run_id, group=record.run.run_group, name=record.run.display_name)
            out["config"].update({u.key: u.value_json for u in record.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: u.value_json for u in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            out["history"].append(row)
            out["history_keys"].update(row)
    return out
