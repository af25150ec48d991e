import sys, time, struct, socket, subprocess
sys.path.insert(0, "/tmp/bgpcap")
from bgplib import *
D = sys.argv[1]
log = []
def note(s):
    print(s, flush=True); log.append({"dir": "event", "t": time.time(), "type": "NOTE", "note": s})
def gobgp(*a):
    r = subprocess.run(["gobgp"] + list(a), capture_output=True, text=True, timeout=20); return r.stdout + r.stderr
caps = [cap(1, struct.pack("!HBB", 1, 0, 1)), cap(1, struct.pack("!HBB", 2, 0, 1)), cap(2),
        cap(65, struct.pack("!I", 65010))]
try:
    p = Peer("gobgp-peer", "127.0.1.1", log=log)
    p.connect()
    p.send(open_msg(65010, 90, "192.0.2.11", caps), "our OPEN")
    assert p.wait_type("OPEN", 15) and p.wait_type("KEEPALIVE", 15)
    p.send(msg(4), "KEEPALIVE confirming OPEN"); p.start_keepalives(5)
    time.sleep(2)
    note("ACTION: gobgp global rib add -a ipv4 10.10.0.0/16 nexthop 127.0.0.1")
    note(gobgp("global", "rib", "add", "-a", "ipv4", "10.10.0.0/16", "nexthop", "127.0.0.1"))
    time.sleep(3)
    note("ACTION: gobgp global rib add -a ipv4 10.20.0.0/16 nexthop 127.0.0.1 med 50 community 65010:100")
    note(gobgp("global", "rib", "add", "-a", "ipv4", "10.20.0.0/16", "nexthop", "127.0.0.1", "med", "50", "community", "65010:100"))
    time.sleep(3)
    note("ACTION: gobgp global rib add -a ipv6 2001:db8:10::/48 nexthop 2001:db8::1")
    note(gobgp("global", "rib", "add", "-a", "ipv6", "2001:db8:10::/48", "nexthop", "2001:db8::1"))
    time.sleep(3)
    note(gobgp("neighbor", "127.0.1.1", "adj-out"))
    note(gobgp("neighbor", "127.0.1.1", "adj-out", "-a", "ipv6"))
    p.close()
finally:
    dump(log, D + "/capture.json"); print("saved", len(log))
