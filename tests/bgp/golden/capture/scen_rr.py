import sys, time, struct, socket
sys.path.insert(0, "/tmp/bgpcap")
from bgplib import *
D = sys.argv[1]; SOCK = D + "/bird.ctl"
log = []
def note(s):
    print(s, flush=True); log.append({"dir": "event", "t": time.time(), "type": "NOTE", "note": s})
CAPS = lambda asn: [cap(1, struct.pack("!HBB", 1, 0, 1)), cap(2), cap(65, struct.pack("!I", asn))]
def establish(p, bgp_id):
    start = len(p.rx); p.connect()
    p.send(open_msg(65010, 90, bgp_id, CAPS(65010)), "our OPEN")
    assert p.wait_type("OPEN", 15, start) and p.wait_type("KEEPALIVE", 15, start)
    p.send(msg(4), "KEEPALIVE confirming bird's OPEN"); p.start_keepalives(5)
try:
    a = Peer("clientA", "127.0.1.1", log=log); b = Peer("clientB", "127.0.1.2", log=log)
    establish(a, "192.0.2.11"); establish(b, "192.0.2.12")
    time.sleep(2)
    attrs = (attr(0x40, 1, b"\x00") + attr(0x40, 2, b"") +
             attr(0x40, 3, socket.inet_aton("127.0.1.1")) + attr(0x40, 5, struct.pack("!I", 100)))
    nb = len(b.rx)
    a.send(update(attrs=attrs, nlri=pfx4("10.200.0.11/32")), "client A announces 10.200.0.11/32")
    r = b.wait_type("UPDATE", 10, nb)
    note(f"B got: {r}")
    time.sleep(2)
    note(birdc(SOCK, "show", "route", "all"))
    note(birdc(SOCK, "show", "route", "table", "igp4"))
    note(birdc(SOCK, "show", "protocols", "all", "clientB"))
    nb = len(b.rx)
    a.send(update(withdrawn=pfx4("10.200.0.11/32")), "client A withdraws 10.200.0.11/32")
    r = b.wait_type("UPDATE", 10, nb)
    note(f"B got: {r}")
    time.sleep(1)
    a.close(); b.close()
finally:
    dump(log, D + "/capture.json"); print("saved", len(log))
