#!/usr/bin/env python3
"""A tiny network client for agentgate's end-to-end tests.

Each argument is one probe: `tcp:HOST:PORT`, `tcp6:HOST:PORT` (AF_INET6 socket), `udp:HOST:PORT`
(unconnected sendto, waits for an echo), `udpc:HOST:PORT` (connected UDP), `bulk:HOST:PORT` (sends
8 MiB to an echo server while reading the echo, then half-closes and reads to the end). IPv6 hosts
go in brackets. For every probe it prints one JSON line: ok, errno, the echoed payload (for bulk:
bytes sent and echoed) and, for TCP, what getpeername() reported.
"""
import hashlib
import json
import os
import socket
import sys
import threading

BULK = 8 * 1024 * 1024


def bulk(host, port, out):
    """Sends random bytes (a lost, repeated or reordered chunk shows); ok when the echo is the same."""
    data = os.urandom(BULK)
    s = socket.create_connection((host, port), timeout=30)
    try:
        sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = hashlib.sha256()
        n = 0
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            echoed.update(chunk)
            n += len(chunk)
        sender.join()
        out["sent"] = len(data)
        out["echoed"] = n
        out["ok"] = n == len(data) and echoed.digest() == hashlib.sha256(data).digest()
    finally:
        s.close()


def split(spec):
    kind, rest = spec.split(":", 1)
    host, port = rest.rsplit(":", 1)
    return kind, host.strip("[]"), int(port)


def probe(spec):
    kind, host, port = split(spec)
    if kind == "bulk":
        out = {"probe": spec, "ok": False}
        try:
            bulk(host, port, out)
        except OSError as e:
            out["errno"] = e.errno
            out["error"] = str(e)
        return out
    fam = socket.AF_INET6 if kind == "tcp6" or ":" in host else socket.AF_INET
    typ = socket.SOCK_DGRAM if kind.startswith("udp") else socket.SOCK_STREAM
    out = {"probe": spec, "ok": False}
    s = socket.socket(fam, typ)
    s.settimeout(5)
    try:
        payload = b"agentgate-probe"
        if kind == "udp":
            s.sendto(payload, (host, port))
            data, _ = s.recvfrom(100)
        else:
            s.connect((host, port))
            if typ == socket.SOCK_STREAM:
                out["peer"] = list(s.getpeername()[:2])
            s.sendall(payload) if typ == socket.SOCK_STREAM else s.send(payload)
            data = s.recv(100)
        out["ok"] = data == payload
        out["echo"] = data.decode(errors="replace")
    except OSError as e:
        out["errno"] = e.errno
        out["error"] = str(e)
    finally:
        s.close()
    return out


for spec in sys.argv[1:]:
    print(json.dumps(probe(spec)), flush=True)
