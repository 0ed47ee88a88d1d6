#!/usr/bin/env python3
"""Opens WebSocket connections through the local balancer and reports how each one ends.

Used by deploy/local/test/selftest.sh to check the nginx upgrade path and the drain of one
node (its sockets closed with 1012, the others untouched). Standard library only.

  ws_probe.py URL COUNT SECONDS [--ready-file PATH] [--stop-file PATH]

Connects COUNT sockets to URL (ws://host:port/path?query), one after the other, writes the
ready file once all are connected (so the caller knows when to act), then waits up to SECONDS
(or until the stop file exists) and
prints one JSON line per socket: {"index", "status", "first_text", "close_code", "closed"}.
status is the HTTP status of the upgrade (101 when it worked); close_code is the code of a
close frame received from the server (null if none); closed tells whether the socket ended
before the time was up.
"""

import base64
import json
import os
import select
import socket
import struct
import sys
import time
from urllib.parse import urlsplit


def connect(url):
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=5)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    status = int(status_line.split()[1]) if len(status_line.split()) > 1 else 0
    rest = head.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in head else b""
    return sock, status, rest


def parse_frames(buffer):
    """Yields (opcode, payload) of the complete server frames in buffer; returns the rest."""
    frames = []
    while len(buffer) >= 2:
        opcode = buffer[0] & 0x0F
        length = buffer[1] & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                break
            length = struct.unpack("!H", buffer[2:4])[0]
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                break
            length = struct.unpack("!Q", buffer[2:10])[0]
            offset = 10
        if len(buffer) < offset + length:
            break
        frames.append((opcode, buffer[offset : offset + length]))
        buffer = buffer[offset + length :]
    return frames, buffer


def main(argv):
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    url, count, seconds = argv[1], int(argv[2]), float(argv[3])
    ready_file = argv[argv.index("--ready-file") + 1] if "--ready-file" in argv else None
    stop_file = argv[argv.index("--stop-file") + 1] if "--stop-file" in argv else None
    results, sockets = [], {}
    for index in range(count):
        result = {"index": index, "status": 0, "first_text": None, "close_code": None, "closed": False}
        try:
            sock, status, rest = connect(url)
            result["status"] = status
            if status == 101:
                sockets[sock] = (result, rest)
            else:
                sock.close()
        except OSError as error:
            result["error"] = str(error)
        results.append(result)
    if ready_file:
        with open(ready_file, "w", encoding="utf-8") as handle:
            handle.write("connected\n")
    deadline = time.monotonic() + seconds
    while sockets and time.monotonic() < deadline and not (stop_file and os.path.exists(stop_file)):
        readable, _, _ = select.select(list(sockets), [], [], 0.2)
        for sock in readable:
            result, buffer = sockets[sock]
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            frames, buffer = parse_frames(buffer + chunk)
            sockets[sock] = (result, buffer)
            for opcode, payload in frames:
                if opcode == 0x1 and result["first_text"] is None:
                    result["first_text"] = payload.decode(errors="replace")
                elif opcode == 0x8:
                    result["close_code"] = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                elif opcode == 0x9:  # ping: answer with a masked pong
                    mask = os.urandom(4)
                    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                    sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)
            if not chunk or result["close_code"] is not None:
                result["closed"] = True
                del sockets[sock]
                sock.close()
    for sock in sockets:
        sock.close()
    for result in results:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
