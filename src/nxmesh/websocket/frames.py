"""RFC 6455 frames after the upgrade: building, masking and parsing them, and close codes.

`_FrameCodec` is the framing state of one connection, shared by both I/O paths (anyio
byte streams in `nxmesh.websocket.streams`, asyncio transports in
`nxmesh.websocket.asyncio_channel`). One binary message carries one protocol frame; no
extension is negotiated, so reserved bits close the connection (1002), a text message
too (1003), a message larger than the limit as well (1009).
"""

from __future__ import annotations

import os
import struct
from collections import deque
from typing import Final

__all__ = [
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_UNSUPPORTED_DATA",
    "DEFAULT_MAX_MESSAGE",
]

DEFAULT_MAX_MESSAGE: Final = 16 * 1024 * 1024

CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002  # reserved bits, bad masking, bad control frames...
CLOSE_UNSUPPORTED_DATA: Final = 1003  # a text message: only binary ones are accepted
CLOSE_MESSAGE_TOO_BIG: Final = 1009  # larger than max_message_bytes


def _frame_header(opcode: int, length: int, *, masked: bool = False) -> bytes:
    """The header of one final (FIN) WebSocket frame carrying `length` payload bytes."""
    first = 0x80 | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes((first, mask_bit | length))
    if length < 65536:
        return _HEADER16.pack(first, mask_bit | 126, length)
    return _HEADER64.pack(first, mask_bit | 127, length)


def _mask(data: bytes, key: bytes) -> bytes:
    """XOR `data` with the 4-byte masking `key` (masking and unmasking alike)."""
    size = len(data)
    if size <= 4096:  # one big-int XOR is fastest for small frames...
        pad = (key * (size // 4 + 1))[:size]
        return (int.from_bytes(data, "little") ^ int.from_bytes(pad, "little")).to_bytes(
            size, "little"
        )
    out = bytearray(data)  # ...C-level byte translation for large ones
    for i in range(4):
        out[i::4] = out[i::4].translate(_XOR_TABLES[key[i]])
    return bytes(out)


_HEADER16: Final = struct.Struct("!BBH")
_HEADER64: Final = struct.Struct("!BBQ")
_XOR_TABLES: Final = tuple(bytes(b ^ k for b in range(256)) for k in range(256))
_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class _Closing(Exception):
    """The frame parser decided to close the connection with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class _FrameCodec:
    """RFC 6455 framing state of one connection, shared by both I/O paths.

    `buffer` holds received bytes not yet parsed; `parse` turns the complete frames in it
    into `ready` messages and `replies` (pongs, the answer to a close) to write.
    """

    __slots__ = (
        "buffer",
        "client",
        "close_sent",
        "ended",
        "in_message",
        "max",
        "open",
        "parts",
        "ready",
        "replies",
        "size",
    )

    def __init__(self, buffer: bytearray, *, client: bool, max_message_bytes: int) -> None:
        self.buffer = buffer
        self.client = client
        self.max = max_message_bytes
        self.parts: list[bytes] = []
        self.size = 0
        self.in_message = False
        self.ready: deque[bytes] = deque()
        self.replies: list[bytes] = []
        self.open = True  # data may still be sent (no close sent or received)
        self.close_sent = False
        self.ended = False  # nothing more will be received

    def frame(self, opcode: int, payload: bytes) -> bytes:
        if self.client:  # RFC 6455 5.3: a fresh unpredictable key for every frame
            key = os.urandom(4)
            return _frame_header(opcode, len(payload), masked=True) + key + _mask(payload, key)
        return _frame_header(opcode, len(payload)) + payload

    def frame_parts(self, head: bytes, body: bytes) -> bytes:
        """One binary message carrying ``head + body``, the body copied once."""
        if self.client:
            return self.frame(_BINARY, head + body)
        return b"".join((_frame_header(_BINARY, len(head) + len(body)), head, body))

    def close_frame(self, code: int, reason: str = "") -> bytes | None:
        """The close frame to send, once; None when one was sent already."""
        self.open = False
        if self.close_sent:
            return None
        self.close_sent = True
        return self.frame(_CLOSE, code.to_bytes(2, "big") + reason.encode()[:120])

    def lost(self) -> None:
        """The connection ended without a close frame (1006)."""
        self.open = False
        self.ended = True

    def parse(self) -> None:
        """Consume every complete frame in the buffer.

        :raises _Closing: the peer broke the protocol; close with its code.
        """
        buf = self.buffer
        pos = 0
        try:
            while not self.ended:
                available = len(buf) - pos
                if available < 2:
                    break
                first, second = buf[pos], buf[pos + 1]
                opcode, length = first & 0x0F, second & 0x7F
                start = pos + 2
                if length == 126:
                    if available < 4:
                        break
                    length = int.from_bytes(buf[start : start + 2], "big")
                    start += 2
                elif length == 127:
                    if available < 10:
                        break
                    length = int.from_bytes(buf[start : start + 8], "big")
                    start += 8
                if first & 0x70:
                    raise _Closing(
                        CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)"
                    )
                if bool(second & 0x80) is self.client:
                    raise _Closing(
                        CLOSE_PROTOCOL_ERROR, "client frames must be masked, server frames not"
                    )
                if opcode >= _CLOSE and (length > 125 or not first & 0x80):
                    raise _Closing(
                        CLOSE_PROTOCOL_ERROR, "control frames are short and unfragmented"
                    )
                if opcode <= _BINARY and self.size + length > self.max:
                    raise _Closing(CLOSE_MESSAGE_TOO_BIG, f"message larger than {self.max} bytes")
                key_end = start if self.client else start + 4
                end = key_end + length
                if len(buf) < end:
                    break
                with memoryview(buf) as view:
                    payload = bytes(view[key_end:end])
                if not self.client:
                    payload = _mask(payload, bytes(buf[start:key_end]))
                pos = end
                self._on_frame(opcode, bool(first & 0x80), payload)
        finally:
            del buf[:pos]

    def _on_frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode in (_BINARY, _CONTINUATION):
            if (opcode == _BINARY) is self.in_message:
                raise _Closing(CLOSE_PROTOCOL_ERROR, "unexpected continuation frame")
            if fin and not self.parts:
                self.ready.append(payload)
                self.in_message = False
                self.size = 0
                return
            self.parts.append(payload)
            self.size += len(payload)
            self.in_message = not fin
            if fin:
                self.ready.append(b"".join(self.parts))
                self.parts.clear()
                self.size = 0
        elif opcode == _TEXT:
            raise _Closing(CLOSE_UNSUPPORTED_DATA, "only binary messages are accepted")
        elif opcode == _PING:
            if self.open:
                self.replies.append(self.frame(_PONG, payload))
        elif opcode == _CLOSE:
            if len(payload) == 1:
                raise _Closing(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
            if not self.close_sent:  # echo the peer's code, as RFC 6455 5.5.1 asks
                self.close_sent = True
                self.replies.append(self.frame(_CLOSE, payload[:2]))
            self.open = False
            self.ended = True
        elif opcode != _PONG:
            raise _Closing(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
