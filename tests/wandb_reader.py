"""Read a W&B offline run file (``run-*.wandb``) back, for tests.

wandb >= 0.2x writes offline runs in a LevelDB-log style format: a 7-byte header
(``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of records, each with a 7-byte header
(crc32c: 4 bytes, length: 2 bytes little-endian, type: 1 byte FULL/FIRST/MIDDLE/LAST) and a
slice of a serialised ``wandb_internal_pb2.Record``. Only what the tests need is decoded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < HEADER:
            pos += left_in_block  # block trailer padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_run(path: str | Path) -> dict[str, Any]:
    """{'id', 'group', 'job_type', 'tags', 'name', 'config': {...}, 'summary': {...},
    'history': {key: [values]}, 'metrics': {name: summary kinds}, 'artifacts': [...],
    'exit_code': the code the run finished with (None: never finished; non-zero: W&B shows
    it failed), 'deprecated': the deprecated W&B features the run used (telemetry)}."""
    out: dict[str, Any] = {
        "config": {},
        "summary": {},
        "history": {},
        "group": None,
        "job_type": None,
        "id": None,
        "tags": [],
        "name": None,
        "metrics": {},
        "artifacts": [],
        "exit_code": None,
        "deprecated": [],
    }
    for payload in _payloads(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["tags"], out["name"] = (
                record.run.run_group,
                list(record.run.tags),
                record.run.display_name,
            )
            out["id"], out["job_type"] = record.run.run_id, record.run.job_type
            for item in record.run.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "metric":
            summary = record.metric.summary
            kinds = [
                k for k in ("min", "max", "mean", "last", "best") if getattr(summary, k, False)
            ]
            out["metrics"][record.metric.name] = kinds
        elif kind == "artifact":
            out["artifacts"].append(
                {
                    "name": record.artifact.name,
                    "type": record.artifact.type,
                    "files": [entry.path for entry in record.artifact.manifest.contents],
                }
            )
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
        elif kind == "telemetry":
            out["deprecated"] += [f.name for f, _ in record.telemetry.deprecated.ListFields()]
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                out["history"].setdefault(key, []).append(json.loads(item.value_json))
    return out


def find_run_files(root: str | Path) -> list[Path]:
    return sorted(Path(root).rglob("run-*.wandb"))
