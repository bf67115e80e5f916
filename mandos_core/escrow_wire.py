"""The escrow exchange on the wire (``escrow 1``), as both sides need it. Stdlib only.

The machine connects to the key server's port and sends ``escrow 1\\r\\n``,
then TLS 1.3 with protocol 1's inverted roles (the machine is the TLS server
with its Mandos TLS key; the key server identifies it by key_id).  Then
frames, each a 4-byte big-endian length and that many bytes:

machine → server, per packet:
  ``{"op": "store", "volume_uuid": U, "created": T, "sha256": H}`` (JSON frame),
  then the packet itself (binary frame);
  or ``{"op": "status", "volume_uuid": U}`` to ask what is stored;
server → machine, for each request:
  ``{"ok": true, "volume_uuid": U, "sha256": H, "created": T, "sequence": N,
  "received": R}`` describing the packet the server now holds for that
  volume (the one it received last; T never later than R), or
  ``{"ok": false, "error": "..."}`` (malformed, quota, rate, disk reserve);
  a machine that may not escrow at all (unknown, disabled, removed, timed
  out) gets no reply: the server closes the connection.
A zero-length frame (or EOF) ends the session.

The machine treats a packet as escrowed only when the reply names the same
SHA-256 as its queued packet.  Limits: JSON frames 4 KiB, packets 64 KiB, 16
requests per connection (then the end marker); both sides drop a peer that
stalls.
"""

from __future__ import annotations

import json
import struct
from typing import Any

ESCROW_LINE = b"escrow 1\r\n"
MAX_JSON = 4096
MAX_PACKET = 64 * 1024
MAX_REQUESTS = 16
READ_TIMEOUT = 15.0


class WireError(Exception):
    pass


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def json_frame(obj: dict[str, Any]) -> bytes:
    return frame(json.dumps(obj, sort_keys=True).encode())


def frame_length(header: bytes, limit: int) -> int:
    (n,) = struct.unpack(">I", header)
    if n > limit:
        raise WireError(f"frame of {n} bytes exceeds the limit of {limit}")
    return n


def parse_json(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        raise WireError("malformed JSON frame") from None
    if not isinstance(obj, dict):
        raise WireError("JSON frame is not an object")
    return obj
