import sys, time, struct, socket
sys.path.insert(0, "/tmp/bgpcap")
from bgplib import *

D = sys.argv[1]
SOCK = D + "/bird.ctl"
log = []
def note(s):
    print(s, flush=True)
    log.append({"dir": "event", "t": time.time(), "type": "NOTE", "note": s})

def caps_std(asn, gr=True, addpath=None, err=True):
    c = [cap(1, struct.pack("!HBB", 1, 0, 1)), cap(1, struct.pack("!HBB", 2, 0, 1)),
         cap(2), cap(65, struct.pack("!I", asn))]
    if err:
        c.append(cap(70))
    if gr:
        c.append(cap(64, struct.pack("!H", 120) + struct.pack("!HBB", 1, 1, 0) + struct.pack("!HBB", 2, 1, 0)))
    if addpath:
        c.append(cap(69, addpath))
    return c

def establish(p, asn=65010, bgp_id="192.0.2.11", caps=None):
    start = len(p.rx)
    p.connect()
    p.send(open_msg(asn, 90, bgp_id, caps if caps is not None else caps_std(asn)), "our OPEN")
    o = p.wait_type("OPEN", 15, start)
    assert o, "no OPEN from bird"
    k = p.wait_type("KEEPALIVE", 15, start)
    assert k, "no KEEPALIVE from bird"
    p.send(msg(4), "KEEPALIVE confirming bird's OPEN")
    p.start_keepalives(5)
    return o

try:
    p = Peer("peer1", "127.0.1.1", log=log)
    establish(p)
    note("peer1 established")
    time.sleep(4)
    note(birdc(SOCK, "show", "protocols", "all", "peer1"))
    note(birdc(SOCK, "show", "route", "export", "peer1", "all"))

    n = len(p.rx)
    note("ACTION: birdc disable static6")
    note(birdc(SOCK, "disable", "static6"))
    time.sleep(3)

    note("ACTION: birdc configure main-withdraw.conf")
    note(birdc(SOCK, "configure", '"/work/main/tests/bgp/golden/bird/main-withdraw.conf"'))
    time.sleep(3)

    note("ACTION: birdc reload in peer1")
    note(birdc(SOCK, "reload", "in", "peer1"))
    time.sleep(3)

    note("ACTION: python sends ROUTE-REFRESH ipv4 unicast")
    p.send(msg(5, struct.pack("!HBB", 1, 0, 1)), "ROUTE-REFRESH request IPv4 unicast")
    time.sleep(3)

    note("ACTION: birdc disable peer1")
    note(birdc(SOCK, "disable", "peer1"))
    time.sleep(2)
    p.close()

    note("ACTION: birdc enable peer1 ; reconnect ; disable with shutdown message")
    note(birdc(SOCK, "enable", "peer1"))
    time.sleep(1)
    p = Peer("peer1b", "127.0.1.1", log=log)
    establish(p)
    time.sleep(3)
    note(birdc(SOCK, "disable", "peer1", '"maintenance"'))
    time.sleep(2)
    p.close()

    note("ACTION: birdc enable peer1 ; reconnect ; birdc restart peer1")
    note(birdc(SOCK, "enable", "peer1"))
    time.sleep(1)
    p = Peer("peer1c", "127.0.1.1", log=log)
    establish(p)
    time.sleep(3)
    note(birdc(SOCK, "restart", "peer1"))
    time.sleep(2)
    p.close()

    # ---- malformed messages ----
    V = attr(0x40, 1, b"\x00") + attr(0x40, 2, b"") + attr(0x40, 3, socket.inet_aton("127.0.1.3")) + attr(0x40, 5, struct.pack("!I", 100))
    tests = [
        ("bad1", "127.0.1.3", "UPDATE, ORIGIN with flags 0x80 (optional bit set on well-known attr)",
         update(attrs=attr(0x80, 1, b"\x00") + V[4:], nlri=pfx4("10.99.1.0/24"))),
        ("bad2", "127.0.1.4", "UPDATE, LOCAL_PREF attribute length 8 overruns the path attribute block",
         update(attrs=V[:-7] + struct.pack("!BBB", 0x40, 5, 8) + struct.pack("!I", 100), nlri=b"")),
        ("bad3", "127.0.1.5", "header length 18 (< 19)", MARKER + struct.pack("!HB", 18, 4)),
        ("bad4", "127.0.1.6", "UPDATE, withdrawn routes length 200 exceeds message",
         msg(2, struct.pack("!H", 200) + b"\x18\x0a\x63\x01" + struct.pack("!H", 0))),
        ("bad5", "127.0.1.7", "message type 7 (unknown)", msg(7, b"")),
        ("bad6", "127.0.1.8", "UPDATE, ORIGIN attribute length 2", 
         update(attrs=attr(0x40, 1, b"\x00\x00") + V[4:], nlri=pfx4("10.99.2.0/24"))),
        ("bad7", "127.0.1.9", "OPEN version 3", None),
    ]
    for name, ip, desc, raw in tests:
        note(f"MALFORMED TEST {name}: {desc}")
        q = Peer(name, ip, log=log)
        if raw is None:
            q.connect()
            body = struct.pack("!BHH4sB", 3, 65010, 90, socket.inet_aton("192.0.2.19"), 0)
            q.send(msg(1, body), "OPEN with version 3")
            r = q.wait_type("NOTIFICATION", 10)
            note(f"{name}: reply {r}")
            q.close()
            continue
        establish(q, bgp_id="192.0.2.%d" % (10 + int(ip.split('.')[-1])))
        time.sleep(1)
        start = len(q.rx)
        q.send(raw, "MALFORMED: " + desc)
        r = q.wait_type("NOTIFICATION", 6, start)
        note(f"{name}: reply {r}")
        note(birdc(SOCK, "show", "route", "protocol", name, "all"))
        note(birdc(SOCK, "show", "protocols", name))
        q.close()
finally:
    dump(log, D + "/capture.json")
    print("saved", len(log), "entries")
