import sys, time, struct, socket
sys.path.insert(0, "/tmp/bgpcap")
from bgplib import *
D = sys.argv[1]; SOCK = D + "/bird.ctl"
log = []
def note(s):
    print(s, flush=True); log.append({"dir": "event", "t": time.time(), "type": "NOTE", "note": s})
ASN = 4200000001
caps = [cap(1, struct.pack("!HBB", 1, 0, 1)), cap(1, struct.pack("!HBB", 2, 0, 1)), cap(2),
        cap(65, struct.pack("!I", ASN)), cap(69, struct.pack("!HBB", 1, 1, 3) + struct.pack("!HBB", 2, 1, 3))]
try:
    p = Peer("peer4", "127.0.1.1", log=log)
    p.connect()
    p.send(open_msg(ASN, 90, "192.0.2.11", caps), "our OPEN (AS_TRANS + cap 65 = 4200000001, ADD-PATH both)")
    assert p.wait_type("OPEN", 15) and p.wait_type("KEEPALIVE", 15)
    p.send(msg(4), "KEEPALIVE confirming bird's OPEN"); p.start_keepalives(5)
    time.sleep(4)
    note(birdc(SOCK, "show", "protocols", "all", "peer4"))
    note("ACTION: birdc disable static4")
    note(birdc(SOCK, "disable", "static4"))
    time.sleep(2)
    note("ACTION: birdc disable static6")
    note(birdc(SOCK, "disable", "static6"))
    time.sleep(2)
    p.close()
finally:
    dump(log, D + "/capture.json"); print("saved", len(log))
