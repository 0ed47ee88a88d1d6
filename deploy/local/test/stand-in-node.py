#!/usr/bin/env python3
"""Stand-in for the `chatgate` binary, used only by deploy/local/test/selftest.sh.

It lets the local-stack scripts (up.sh, down.sh, restart-node.sh) and the nginx balancer be
tested on a machine where the real gateway is not built yet, or without building it. It speaks
just enough of the contract (README.md "Configuration", docs/protocol.md "REST") for that, and nothing of chat:

  stand-in-node.py serve          listens on CHATGATE_LISTEN; needs REDIS_URL, DATABASE_URL and
                                  CHATGATE_JWT_SECRET set, as cluster mode does (exit 2 if not)
      GET /healthz                200
      GET /readyz                 200, or 503 while draining
      GET /ws                     WebSocket upgrade (401 without ?token=); sends one text frame
                                  {"kind":"stand_in_hello","nodeId":...} and keeps the socket
  stand-in-node.py token --user U prints a token (not a JWT) alone on one line
  SIGTERM                         drain: /readyz 503, sockets closed with 1012, then exit 0
                                  after min(CHATGATE_DRAIN_GRACE, 1 s)
"""

import base64
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
NODE_ID = os.environ.get("CHATGATE_NODE_ID", "stand-in")
draining = threading.Event()
sockets_lock = threading.Lock()
open_sockets = []


def ws_frame(opcode, payload):
    header = bytes([0x80 | opcode])
    if len(payload) < 126:
        header += bytes([len(payload)])
    else:
        header += bytes([126]) + struct.pack("!H", len(payload))
    return header + payload


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write(f"{NODE_ID} {self.command} {self.path} {args[1] if len(args) > 1 else ''}\n")

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self.reply(200, {"status": "ok", "nodeId": NODE_ID})
        elif path == "/readyz":
            if draining.is_set():
                self.reply(503, {"status": "draining", "nodeId": NODE_ID})
            else:
                self.reply(200, {"status": "ready", "nodeId": NODE_ID})
        elif path == "/ws":
            self.upgrade()
        else:
            self.reply(404, {"success": False})

    def upgrade(self):
        if "token=" not in self.path and not self.headers.get("Authorization"):
            self.reply(401, {"success": False})
            return
        if draining.is_set():
            self.reply(503, {"status": "draining"})
            return
        key = self.headers.get("Sec-WebSocket-Key", "")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            self.reply(400, {"success": False, "error": "not a WebSocket upgrade"})
            return
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        conn = self.connection
        conn.sendall(ws_frame(0x1, json.dumps({"kind": "stand_in_hello", "nodeId": NODE_ID}).encode()))
        with sockets_lock:
            open_sockets.append(conn)
        # Hold the socket until the peer goes away or the drain closes it.
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass
        self.close_connection = True


def grace_seconds():
    raw = os.environ.get("CHATGATE_DRAIN_GRACE", "25s")
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if raw.endswith(suffix) and raw[: -len(suffix)].isdigit():
            return int(raw[: -len(suffix)]) * units[suffix]
    return 25


def serve():
    missing = [v for v in ("REDIS_URL", "DATABASE_URL", "CHATGATE_JWT_SECRET") if not os.environ.get(v)]
    if missing:
        print(f"stand-in: {', '.join(missing)} must be set", file=sys.stderr)
        return 2
    host, _, port = os.environ.get("CHATGATE_LISTEN", "127.0.0.1:3001").rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True

    def on_term(_signum, _frame):
        draining.set()
        with sockets_lock:
            for conn in open_sockets:
                try:
                    conn.sendall(ws_frame(0x8, struct.pack("!H", 1012) + b"draining"))
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def finish():
            time.sleep(min(grace_seconds(), 1.0))
            server.shutdown()

        threading.Thread(target=finish, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    print(f"stand-in node {NODE_ID} listening on {host}:{port}", file=sys.stderr, flush=True)
    server.serve_forever()
    print(f"stand-in node {NODE_ID} drained, exiting", file=sys.stderr, flush=True)
    return 0


def main(argv):
    command = argv[1] if len(argv) > 1 else "serve"
    if command == "serve":
        return serve()
    if command == "token" and "--user" in argv:
        user = argv[argv.index("--user") + 1]
        print(f"stand-in-token-{user}")
        return 0
    print("usage: stand-in-node.py [serve | token --user ID]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
