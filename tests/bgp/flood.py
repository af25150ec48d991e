#!/usr/bin/env python3
"""A misbehaving site router, for tests/bgp_netns.rs: waits for the gateway to connect to
ADDR:179, opens a session WITHOUT the route-refresh capability, then sends REFRESHES
ROUTE-REFRESH messages and UPDATES UPDATEs of PER host prefixes each, all inside the cloud block
(refused by the gateway's policy), interleaved, as fast as the socket takes them. It keeps the
session up with KEEPALIVEs, counts the End-of-RIB markers the gateway sends back, and writes
{"eor": N, "sent": true} to OUT once done. Runs until killed.

usage: flood.py ADDR ASN ROUTER_ID OUT REFRESHES UPDATES PER"""
import json, socket, struct, sys, threading, time

addr, asn, rid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
refreshes, updates, per = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])


def msg(kind, body=b""):
    return b"\xff" * 16 + struct.pack("!HB", 19 + len(body), kind) + body


caps = bytes([1, 4, 0, 1, 0, 1]) + bytes([65, 4]) + struct.pack("!I", asn)
opt = bytes([2, len(caps)]) + caps
OPEN = msg(1, struct.pack("!BHH4sB", 4, asn, 30, socket.inet_aton(rid), len(opt)) + opt)
KEEPALIVE = msg(4)
REFRESH = msg(5, struct.pack("!HBB", 1, 0, 1))
attrs = (bytes([0x40, 1, 1, 0]) + bytes([0x40, 2, 0]) + bytes([0x40, 3, 4]) + socket.inet_aton(addr)
         + bytes([0x40, 5, 4]) + struct.pack("!I", 100))


def update(i):
    nlri = b"".join(bytes([32, 10, 200, (i * per + k) // 256 % 256, (i * per + k) % 256])
                    for k in range(per))
    return msg(2, struct.pack("!H", 0) + struct.pack("!H", len(attrs)) + attrs + nlri)


lsn = socket.socket()
lsn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsn.bind((addr, 179))
lsn.listen(4)
conn, _ = lsn.accept()
lock = threading.Lock()
state = {"eor": 0, "established": threading.Event()}


def send(b):
    with lock:
        conn.sendall(b)


def reader():
    buf = b""
    while True:
        d = conn.recv(65536)
        if not d:
            return
        buf += d
        while len(buf) >= 19:
            n, kind = struct.unpack_from("!HB", buf, 16)
            if len(buf) < n:
                break
            m, buf = buf[:n], buf[n:]
            if kind == 1:
                send(OPEN + KEEPALIVE)
            elif kind == 4:
                state["established"].set()
            elif kind == 2 and n == 23:
                state["eor"] += 1


def keepalives():
    while True:
        time.sleep(5)
        send(KEEPALIVE)


threading.Thread(target=reader, daemon=True).start()
state["established"].wait(30)
threading.Thread(target=keepalives, daemon=True).start()
each = max(1, refreshes // max(1, updates))
sent_refresh = 0
for i in range(updates):
    send(update(i))
    for _ in range(each):
        if sent_refresh < refreshes:
            send(REFRESH)
            sent_refresh += 1
while sent_refresh < refreshes:
    send(REFRESH)
    sent_refresh += 1
time.sleep(3)
with open(out + ".tmp", "w") as f:
    json.dump({"eor": state["eor"], "sent": True}, f)
import os
os.rename(out + ".tmp", out)
while True:
    time.sleep(60)
