import json, sys, os
sys.path.insert(0, "/tmp/bgpcap")
from decode import decode

OUT = "/work/main/tests/bgp/golden"
cap = {n: json.load(open(f"/tmp/bgpcap/{n}/capture.json")) for n in ["ap-cap-1", "ap-cap-2", "ap-cap-3", "ap-cap-4"]}

BIRD = "BIRD 2.0.12 (`bird --version` → `BIRD version 2.0.12`; Debian package bird2 2.0.12-7)"
GOBGP = "GoBGP 3.10.0 (`gobgpd --version` → `gobgpd version 3.10.0`; Debian package gobgpd 3.10.0-1+b4)"
PY = "the python capture speaker (`capture/bgplib.py`), i.e. NOT an independent implementation"

F_PEER1 = """protocol bgp peer1 {            # bird/main.conf, router id 192.0.2.1
  local 127.0.0.1 as 65010;
  neighbor 127.0.1.1 as 65010;
  passive on;
  hold time 90;
  graceful restart on;
  ipv4 { import all; export filter { if net = 10.20.0.0/16 then { bgp_med = 50; bgp_community.add((65010,100)); } accept; }; add paths on; };
  ipv6 { import all; export all; add paths on; next hop address 2001:db8::1; };
}"""
F_STATIC4 = """protocol static static4 { ipv4; route 10.10.0.0/16 blackhole; route 10.20.0.0/16 blackhole; }"""
F_STATIC6 = """protocol static static6 { ipv6; route 2001:db8:10::/48 blackhole; }"""
F_BAD = """template bgp badpeer {           # bird/main.conf, router id 192.0.2.1
  local 127.0.0.1 as 65010; passive on; hold time 90;
  ipv4 { import all; export none; };
}
protocol bgp badN from badpeer { neighbor 127.0.1.N as 65010; }   # bad1..bad7 = 127.0.1.3 .. 127.0.1.9"""
F_RR = """router id 192.0.2.1;               # bird/rr.conf
template bgp rrclient {
  local 127.0.0.1 as 65010; passive on; hold time 90;
  rr client;
  rr cluster id 192.0.2.254;
  ipv4 { import all; export all; };
}
protocol bgp clientA from rrclient { neighbor 127.0.1.1 as 65010; }
protocol bgp clientB from rrclient { neighbor 127.0.1.2 as 65010; }"""
F_AS4 = """router id 192.0.2.2;               # bird/as4.conf
protocol static static4 { ipv4; route 10.10.0.0/16 blackhole; }
protocol static static6 { ipv6; route 2001:db8:10::/48 blackhole; }
protocol bgp peer4 {
  local 127.0.0.1 as 4200000001;
  neighbor 127.0.1.1 as 4200000001;
  passive on; hold time 90;
  ipv4 { import all; export all; add paths on; };
  ipv6 { import all; export all; add paths on; next hop address 2001:db8::1; };
}"""
F_GOBGP = """# gobgp/gobgpd.toml: AS 65010, router-id 192.0.2.3, listens 127.0.0.1:179,
# neighbor 127.0.1.1 (peer-as 65010, passive-mode, hold-time 90), afi-safis ipv4-unicast + ipv6-unicast"""

PY_OPEN_MAIN = "python peer1 OPEN: AS 65010, hold 90, BGP id 192.0.2.11, caps MP IPv4+IPv6 unicast, Route Refresh, 4-octet AS 65010, Enhanced Route Refresh, Graceful Restart (120 s, IPv4+IPv6); no ADD-PATH (so bird's UPDATEs below carry no path IDs)"

E = []
def e(name, src, idx, who, typ, trigger, frag, addpath=False, lenient=False, note=None):
    E.append(dict(name=name, src=src, idx=idx, who=who, typ=typ, trigger=trigger, frag=frag, addpath=addpath, lenient=lenient, note=note))

c1, c2, c3, c4 = "ap-cap-1", "ap-cap-2", "ap-cap-3", "ap-cap-4"
e("01-open-bird-ibgp-full-caps", c1, 0, BIRD, "OPEN", "sent by bird to peer1 right after the python speaker connected (bird is passive).", F_PEER1,
  note="All capabilities are packed into ONE optional parameter (type 2). Graceful Restart lists IPv4 and IPv6 (from `graceful restart on`); ADD-PATH 3 = send+receive (from `add paths on`); Enhanced Route Refresh and an empty Long-Lived GR capability are bird defaults.")
e("02-open-bird-as4200000001", c3, 0, BIRD, "OPEN", "sent by bird to peer4 (iBGP in AS 4200000001).", F_AS4,
  note="My AS carries AS_TRANS 23456 (0x5ba0); the real ASN 4200000001 = 0xfa56ea01 is in capability 65. Without `graceful restart on` bird still advertises GR with restart time 120 and no AFI entries (restart-aware only).")
e("03-open-bird-defaults", c1, 62, BIRD, "OPEN", "sent by bird to bad1 (a session with only an IPv4 channel and default options).", F_BAD,
  note="bird's default capability set for an IPv4-only iBGP session. The route-reflector sessions in bird/rr.conf sent a byte-identical OPEN (same AS, router id and options; `rr client` does not change the OPEN).")
e("04-keepalive", c1, 2, BIRD, "KEEPALIVE", "sent by bird to peer1 right after its OPEN, confirming the python OPEN; every KEEPALIVE bird sent is identical.", F_PEER1)
e("05-update-ipv4-basic", c1, 6, BIRD, "UPDATE", "initial export to peer1 of static route 10.10.0.0/16.", F_STATIC4 + "\n" + F_PEER1,
  note="iBGP: empty AS_PATH, NEXT_HOP = bird's session source address 127.0.0.1 (blackhole static route has no gateway), LOCAL_PREF 100 added by bird by default.")
e("06-update-ipv4-med-community", c1, 5, BIRD, "UPDATE", "initial export to peer1 of static route 10.20.0.0/16 (the export filter sets MED 50 and community (65010,100)); bird sent this one first.", F_STATIC4 + "\n" + F_PEER1,
  note="Attribute order as bird emits it: ORIGIN, AS_PATH, NEXT_HOP, MED, LOCAL_PREF, COMMUNITIES (ascending type code).")
e("07-update-ipv4-end-of-rib", c1, 7, BIRD, "UPDATE", "sent by bird to peer1 after the initial IPv4 export.", F_PEER1,
  note="bird sends End-of-RIB markers on every session, also where the peer did not advertise Graceful Restart (seen on the rr.conf sessions too).")
e("08-update-ipv6-mp-reach", c1, 8, BIRD, "UPDATE", "initial export to peer1 of static route 2001:db8:10::/48.", F_STATIC6 + "\n" + F_PEER1,
  note="bird puts MP_REACH_NLRI first and encodes it with the Extended-Length flag (0x90) although the value is < 256 bytes. The next hop is the configured `next hop address 2001:db8::1` (16-byte global only; the session runs over IPv4). No NEXT_HOP attribute (3). After `birdc configure` (which re-enabled static6), bird re-announced the route with byte-identical content.")
e("09-update-ipv6-end-of-rib", c1, 9, BIRD, "UPDATE", "sent by bird to peer1 after the initial IPv6 export.", F_PEER1,
  note="The empty MP_UNREACH_NLRI here uses flags 0x80 (no Extended-Length bit), unlike non-empty ones.")
e("10-update-ipv6-mp-unreach", c1, 13, BIRD, "UPDATE", "`birdc disable static6` withdrew 2001:db8:10::/48.", F_STATIC6 + "\n" + F_PEER1)
e("11-update-ipv4-withdraw", c1, 18, BIRD, "UPDATE", "`birdc configure \"bird/main-withdraw.conf\"` (same config without 10.20.0.0/16) withdrew 10.20.0.0/16.", F_STATIC4 + "  # -> main-withdraw.conf drops the 10.20.0.0/16 line\n" + F_PEER1)
e("12-update-rr-reflected", c2, 10, BIRD, "UPDATE", "bird (route reflector) reflected client A's announcement (file 39) of 10.200.0.11/32 to client B.", F_RR,
  note="bird's router id 192.0.2.1, cluster id 192.0.2.254 (explicitly configured; bird's default would be the router id). ORIGINATOR_ID = client A's BGP Identifier 192.0.2.11; CLUSTER_LIST = [192.0.2.254]. NEXT_HOP 127.0.1.1 and LOCAL_PREF 100 are passed through unchanged. (bird showed the route as `unreachable` in its own table because it does not resolve next hops in 127/8; that does not affect what it reflects.)")
e("13-update-rr-reflected-withdraw", c2, 17, BIRD, "UPDATE", "bird reflected client A's withdrawal (file 40) of 10.200.0.11/32 to client B.", F_RR)
e("14-update-ipv4-addpath", c3, 4, BIRD, "UPDATE", "initial export to peer4 of 10.10.0.0/16; ADD-PATH is negotiated for IPv4 (python advertised send+receive), so the NLRI carries a 4-byte path ID.", F_AS4, addpath=True,
  note="AS_PATH is empty (iBGP), so the 4-octet AS of this session does not show here.")
e("15-update-ipv6-addpath", c3, 6, BIRD, "UPDATE", "initial export to peer4 of 2001:db8:10::/48 with ADD-PATH negotiated for IPv6.", F_AS4, addpath=True)
e("16-update-ipv4-addpath-withdraw", c3, 10, BIRD, "UPDATE", "`birdc disable static4` withdrew 10.10.0.0/16 (path ID kept in the withdrawn routes field).", F_AS4, addpath=True)
e("17-update-ipv6-addpath-mp-unreach", c3, 14, BIRD, "UPDATE", "`birdc disable static6` withdrew 2001:db8:10::/48 (path ID in MP_UNREACH_NLRI).", F_AS4, addpath=True)
e("18-route-refresh-ipv4", c1, 22, BIRD, "ROUTE-REFRESH", "`birdc reload in peer1`: bird asked the peer to resend IPv4 unicast (one request per channel).", F_PEER1)
e("19-route-refresh-ipv6", c1, 23, BIRD, "ROUTE-REFRESH", "`birdc reload in peer1`: the IPv6 unicast request sent right after file 18.", F_PEER1)
e("20-route-refresh-borr-ipv4", c1, 28, BIRD, "ROUTE-REFRESH", "reply to a python ROUTE-REFRESH request for IPv4 unicast (`ffff…0017 05 0001 00 01`); both sides had advertised Enhanced Route Refresh (70), so bird framed the re-sent routes with BoRR ... EoRR. Between this and file 21 bird re-sent 10.10.0.0/16 (byte-identical to file 05).", F_PEER1)
e("21-route-refresh-eorr-ipv4", c1, 30, BIRD, "ROUTE-REFRESH", "end of the enhanced route refresh started by file 20.", F_PEER1)
e("22-notification-cease-admin-shutdown", c1, 32, BIRD, "NOTIFICATION", "`birdc disable peer1`; bird closed TCP afterwards.", F_PEER1)
e("23-notification-cease-admin-shutdown-message", c1, 45, BIRD, "NOTIFICATION", "`birdc disable peer1 \"maintenance\"` (after `birdc enable peer1` and a fresh session).", F_PEER1)
e("24-notification-cease-admin-reset", c1, 58, BIRD, "NOTIFICATION", "`birdc restart peer1` (fresh session).", F_PEER1)
e("25-sent-update-attr-length-overrun", c1, 77, PY, "UPDATE", "sent by python to bad2 on an Established session: LOCAL_PREF claims length 8 but only 4 bytes remain in the path attribute block. bird answered with file 26 and closed the session (log: `bad2: Malformed attribute list - framing error (8/4) at 17`).", F_BAD, lenient=True)
e("26-notification-malformed-attribute-list", c1, 78, BIRD, "NOTIFICATION", "bird's reply to file 25.", F_BAD)
e("27-sent-header-length-18", c1, 88, PY, "KEEPALIVE", "sent by python to bad3: a KEEPALIVE whose header Length field says 18 (< 19). The file holds the 19 bytes that were written to the socket.", F_BAD, lenient=True)
e("28-notification-bad-message-length", c1, 89, BIRD, "NOTIFICATION", "bird's reply to file 27 (log: `bad3: Error: Bad message length: 0012`).", F_BAD,
  note="Data = the offending Length field (0x0012), as RFC 4271 6.1 requires.")
e("29-sent-update-withdrawn-length-overrun", c1, 99, PY, "UPDATE", "sent by python to bad4: Withdrawn Routes Length 200 exceeds the message. bird answered with file 30.", F_BAD, lenient=True)
e("30-notification-malformed-attribute-list-2", c1, 100, BIRD, "NOTIFICATION", "bird's reply to file 29 (byte-identical to file 26; RFC 4271 6.3 uses Malformed Attribute List for a bad Withdrawn Routes Length too).", F_BAD)
e("31-sent-unknown-type-7", c1, 110, PY, "7", "sent by python to bad5: a 19-byte message of type 7. bird answered with file 32.", F_BAD, lenient=True)
e("32-notification-bad-message-type", c1, 111, BIRD, "NOTIFICATION", "bird's reply to file 31 (log: `bad5: Error: Bad message type: 07`).", F_BAD,
  note="Data = the offending type octet (RFC 4271 6.1).")
e("33-sent-open-version-3", c1, 129, PY, "OPEN", "sent by python to bad7 as its first message: OPEN with version 3, no optional parameters. bird answered with file 34.", F_BAD)
e("34-notification-unsupported-version", c1, 130, BIRD, "NOTIFICATION", "bird's reply to file 33 (log: `bad7: Error: Unsupported version number: 0400`).", F_BAD,
  note="QUIRK: RFC 4271 6.2 says the data is the largest supported version as a 2-octet unsigned integer in network order, i.e. `0004`. bird 2.0.12 sent `0400` (apparently the u16 value 4 written in the host's little-endian order; inferred from the bytes, not from bird's source). Do not treat these data bytes as the correct encoding; a correct speaker sends `0004`.")
e("35-sent-update-origin-bad-flags", c1, 66, PY, "UPDATE", "sent by python to bad1: ORIGIN with flags 0x80 (Optional set on a well-known attribute). bird sent NO NOTIFICATION: it applied RFC 7606 treat-as-withdraw (log: `bad1: Malformed origin attribute - conflicting flags (80)` / `Invalid route 10.99.1.0/24 withdrawn`) and the session stayed Established.", F_BAD, lenient=True)
e("36-sent-update-origin-length-2", c1, 121, PY, "UPDATE", "sent by python to bad6: ORIGIN with length 2. bird sent NO NOTIFICATION: treat-as-withdraw (log: `bad6: Malformed ORIGIN attribute - invalid length (2)` / `Invalid route 10.99.2.0/24 withdrawn`); session stayed Established.", F_BAD, lenient=True)
e("37-sent-open-peer1", c1, 1, PY, "OPEN", "python's OPEN to bird's peer1; bird accepted it (session Established, see files 01/04). " + PY_OPEN_MAIN, F_PEER1)
e("38-sent-open-as4200000001-addpath", c3, 1, PY, "OPEN", "python's OPEN to bird's peer4; bird accepted it (`birdc show protocols all peer4` listed Neighbor ADD-PATH RX/TX ipv4 ipv6).", F_AS4)
e("39-sent-update-rr-client-a", c2, 9, PY, "UPDATE", "client A (127.0.1.1, BGP id 192.0.2.11) announced 10.200.0.11/32 to bird; bird accepted it (`birdc show route all`: origin IGP, empty as_path, next_hop 127.0.1.1, local_pref 100) and reflected it as file 12.", F_RR)
e("40-sent-update-rr-client-a-withdraw", c2, 16, PY, "UPDATE", "client A withdrew 10.200.0.11/32; bird reflected the withdrawal as file 13.", F_RR)
e("gobgp-01-open", c4, 0, GOBGP, "OPEN", "sent by gobgpd to the python speaker (gobgpd passive, python connected from 127.0.1.1).", F_GOBGP,
  note="All capabilities in one optional parameter, in this order: Route Refresh, FQDN, MP IPv4, MP IPv6, 4-octet AS, Extended Next Hop. The FQDN capability carries the machine's hostname (`vm`) and will differ on other hosts.")
e("gobgp-02-update-ipv4", c4, 5, GOBGP, "UPDATE", "`gobgp global rib add -a ipv4 10.10.0.0/16 nexthop 127.0.0.1`.", F_GOBGP,
  note="ORIGIN is INCOMPLETE (gobgp CLI default).")
e("gobgp-03-update-ipv4-med-community", c4, 9, GOBGP, "UPDATE", "`gobgp global rib add -a ipv4 10.20.0.0/16 nexthop 127.0.0.1 med 50 community 65010:100`.", F_GOBGP)
e("gobgp-04-update-ipv6-mp-reach", c4, 12, GOBGP, "UPDATE", "`gobgp global rib add -a ipv6 2001:db8:10::/48 nexthop 2001:db8::1`.", F_GOBGP,
  note="Differs from bird (file 08): gobgp puts MP_REACH_NLRI last and uses flags 0x80 (no Extended-Length bit).")

TYPEN = {"OPEN": 1, "UPDATE": 2, "NOTIFICATION": 3, "KEEPALIVE": 4, "ROUTE-REFRESH": 5, "7": 7}
readme_entries = []
for x in E:
    m = cap[x["src"]][x["idx"]]
    raw = bytes.fromhex(m["hex"])
    assert raw[18] == TYPEN[x["typ"]], (x["name"], raw[18])
    assert (m["dir"] == "tx") == (x["who"] == PY), x["name"]
    h = raw.hex()
    lines = [h[i:i + 64] for i in range(0, len(h), 64)]
    path = f"{OUT}/{x['name']}.hex"
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    assert bytes.fromhex(open(path).read().replace("\n", "")) == raw
    dec = decode(raw, addpath=x["addpath"], lenient=x["lenient"])
    x["dec"] = dec
    x["len"] = len(raw)
    x["dirn"] = "captured from the TCP stream (bird → python)" if m["dir"] == "rx" else "python → bird, as written to the socket"
    readme_entries.append(x)
json.dump([{k: v for k, v in x.items() if k != 'frag'} for x in readme_entries], open("/tmp/bgpcap/entries.json", "w"), indent=1)
print("wrote", len(E), "files")

# ---------------------------------------------------------------- README
R = []
w = R.append
w("""# BGP golden wire-format vectors

Byte-exact BGP-4 messages captured from **real, independent BGP implementations**
(BIRD 2.0.12, plus a few from GoBGP 3.10.0), for testing the embedded iBGP speaker's
encoder and decoder. Nothing here was produced by this project's code.

## File format

Each `NN-name.hex` holds exactly one complete BGP message, starting with the 16-byte
`ff` marker, as lowercase hex, 32 bytes (64 hex digits) per line, every line ending in
`\\n`, nothing else. Decode with e.g. `hex::decode(text.split_whitespace().collect::<String>())`.

Files named `NN-sent-*` were written by the small python speaker used for the capture
(`capture/bgplib.py`), not by bird: they are the messages bird *accepted* (37–40), or the
deliberately malformed ones bird was sent (25, 27, 29, 31, 33, 35, 36) next to bird's
answers. Treat them as inputs whose effect on bird is recorded, not as reference encodings
from an independent implementation.

## How they were captured

- Implementations: """ + BIRD + """; """ + GOBGP + """. Host: Debian, Linux 6.18, python 3.11.7.
- Each scenario ran in its own network namespace (`ap-cap-1` main, `ap-cap-2` route
  reflection, `ap-cap-3` 4-byte ASN + ADD-PATH, `ap-cap-4` gobgp) with only `lo` up
  (plus `2001:db8::1/128` on `lo`, used only as an IPv6 next-hop value). No kernel
  protocol was configured, so bird never touched a kernel routing table.
- bird ran in the foreground: `ip netns exec ap-cap-N bird -f -c CONF -s SOCK -P PIDFILE`,
  listening (`passive on`) on `127.0.0.1:179`. The python speaker connected from
  127.0.1.x (bound source address), sent its OPEN, answered with KEEPALIVEs and recorded
  every byte bird sent. Actions were driven with `birdc`.
- All sessions are iBGP: AS 65010 (`bird/main.conf`, `bird/rr.conf`) or AS 4200000001
  (`bird/as4.conf`). bird router id 192.0.2.1 (main, rr) / 192.0.2.2 (as4); route
  reflector cluster id 192.0.2.254 (configured explicitly; bird's default is the router id).
- Python peers: peer1 = 127.0.1.1 (BGP id 192.0.2.11), RR client A = 127.0.1.1
  (192.0.2.11), RR client B = 127.0.1.2 (192.0.2.12), peer4 = 127.0.1.1 (192.0.2.11),
  malformed-message peers bad1..bad7 = 127.0.1.3..127.0.1.9.
- 4-octet AS numbers were negotiated on every session, so AS_PATH would use 4-byte ASNs
  (all AS_PATHs here are empty, as bird originates them over iBGP). ADD-PATH was negotiated
  only in `ap-cap-3` (files 14–17); all other UPDATEs have no path IDs.
- Full configs: `bird/main.conf`, `bird/main-withdraw.conf`, `bird/rr.conf`, `bird/as4.conf`,
  `gobgp/gobgpd.toml`. Capture and decode scripts: `capture/` (they use scratch paths
  under /tmp/bgpcap; see `capture/README`).
- Every decode below was produced by `capture/decode.py`, which checks each length field
  against the bytes present (header length, optional parameter/capability lengths,
  withdrawn/attribute lengths, attribute lengths, MP_REACH next-hop length, prefix
  lengths) and the Optional/Transitive flag bits of every known attribute. All
  non-`sent` files pass these checks.

## Index

| file | producer | message | what |
| --- | --- | --- | --- |
""")
SHORT = {
 "01": "OPEN, AS 65010, caps MP v4+v6, RR, GR(v4,v6), AS4, ADD-PATH(v4,v6), ERR, LLGR",
 "02": "OPEN, AS 4200000001 (My AS = AS_TRANS 23456)",
 "03": "OPEN with bird's default capabilities, IPv4 only (also what rr.conf sent)",
 "04": "KEEPALIVE",
 "05": "10.10.0.0/16: ORIGIN, AS_PATH (empty), NEXT_HOP, LOCAL_PREF",
 "06": "10.20.0.0/16: + MED 50, COMMUNITIES (65010,100)",
 "07": "IPv4 unicast End-of-RIB",
 "08": "MP_REACH_NLRI IPv6 2001:db8:10::/48, next hop 2001:db8::1",
 "09": "IPv6 unicast End-of-RIB (empty MP_UNREACH_NLRI)",
 "10": "MP_UNREACH_NLRI withdraws 2001:db8:10::/48",
 "11": "IPv4 withdrawn routes field: 10.20.0.0/16",
 "12": "route reflected to client B with ORIGINATOR_ID + CLUSTER_LIST",
 "13": "reflected withdrawal of 10.200.0.11/32",
 "14": "ADD-PATH IPv4 NLRI (path ID 2)",
 "15": "ADD-PATH IPv6 MP_REACH_NLRI (path ID 3)",
 "16": "ADD-PATH IPv4 withdrawal (path ID 2)",
 "17": "ADD-PATH IPv6 MP_UNREACH_NLRI (path ID 3)",
 "18": "route refresh request IPv4 unicast (`birdc reload in`)",
 "19": "route refresh request IPv6 unicast (`birdc reload in`)",
 "20": "enhanced route refresh BoRR IPv4",
 "21": "enhanced route refresh EoRR IPv4",
 "22": "Cease / Administrative Shutdown (`birdc disable`)",
 "23": "Cease / Administrative Shutdown with message \"maintenance\"",
 "24": "Cease / Administrative Reset (`birdc restart`)",
 "25": "malformed: attribute length overruns attribute block",
 "26": "reply to 25: UPDATE error / Malformed Attribute List",
 "27": "malformed: header Length 18",
 "28": "reply to 27: Header error / Bad Message Length (data 0012)",
 "29": "malformed: Withdrawn Routes Length 200 overruns message",
 "30": "reply to 29: UPDATE error / Malformed Attribute List",
 "31": "malformed: message type 7",
 "32": "reply to 31: Header error / Bad Message Type (data 07)",
 "33": "malformed: OPEN version 3",
 "34": "reply to 33: OPEN error / Unsupported Version (data 0400, bird quirk)",
 "35": "ORIGIN flags 0x80: bird treat-as-withdraw, no NOTIFICATION",
 "36": "ORIGIN length 2: bird treat-as-withdraw, no NOTIFICATION",
 "37": "python OPEN accepted by bird (AS 65010, one param per capability)",
 "38": "python OPEN accepted by bird (AS 4200000001, ADD-PATH)",
 "39": "RR client A announces 10.200.0.11/32 (accepted)",
 "40": "RR client A withdraws 10.200.0.11/32 (accepted)",
 "gobgp-01": "gobgp OPEN (RR, FQDN, MP v4+v6, AS4, Extended Next Hop)",
 "gobgp-02": "gobgp 10.10.0.0/16, ORIGIN INCOMPLETE",
 "gobgp-03": "gobgp 10.20.0.0/16 with MED 50 + community",
 "gobgp-04": "gobgp IPv6 MP_REACH_NLRI (placed last, flags 0x80)",
}
def short(x):
    n = x["name"]
    return SHORT["gobgp-" + n.split("-")[1] if n.startswith("gobgp") else n[:2]]
for x in readme_entries:
    prod = "bird 2.0.12" if x["who"] == BIRD else ("gobgp 3.10.0" if x["who"] == GOBGP else "python (sent)")
    typ = {"7": "type 7"}.get(x["typ"], x["typ"])
    w(f"| `{x['name']}.hex` | {prod} | {typ}, {x['len']} B | {short(x).replace('|', '/')} |\n")

w("""
## Observations worth testing against

- bird packs all capabilities into a single Optional Parameter (type 2); the python
  speaker used one parameter per capability (37, 38) and bird accepted that. gobgp also
  uses one parameter.
- bird emits attributes in ascending type-code order, except that MP_REACH_NLRI /
  MP_UNREACH_NLRI come first; gobgp puts MP_REACH_NLRI last (gobgp-04).
- bird sets the Extended-Length flag (0x90) on non-empty MP_REACH/MP_UNREACH even when the
  value is shorter than 256 bytes (08, 10, 15, 17), but not on the empty MP_UNREACH of the
  IPv6 End-of-RIB (09, flags 0x80). gobgp uses 0x80 (gobgp-04). A decoder must accept both.
- IPv6 routes over an IPv4 session: no NEXT_HOP attribute; MP_REACH next hop length 16
  (global address only) taken from `next hop address`.
- bird sends End-of-RIB markers (07, 09) on every session, also to peers that did not
  advertise Graceful Restart (the rr.conf sessions).
- iBGP defaults: bird adds LOCAL_PREF 100, leaves AS_PATH empty, and uses its session source
  address (127.0.0.1) as NEXT_HOP for locally originated routes.
- Route reflection (12): bird appends ORIGINATOR_ID (= client A's BGP Identifier) and
  CLUSTER_LIST (= [cluster id]) after LOCAL_PREF, and passes NEXT_HOP/LOCAL_PREF unchanged.
- RFC 7606 in bird: a wrong-flags or wrong-length ORIGIN (35, 36) is "treat-as-withdraw"
  with no NOTIFICATION; framing errors (25, 29) get NOTIFICATION 3/1 with no data, header
  errors get 1/2 (data = bad length) and 1/3 (data = bad type).
- bird quirk: its OPEN "Unsupported Version Number" NOTIFICATION (34) carries data
  `0400` (apparently little-endian) instead of the RFC's `0004`.
- `birdc reload in` sends one ROUTE-REFRESH per negotiated AFI/SAFI (18, 19). With
  Enhanced Route Refresh negotiated, bird answers a refresh request with BoRR, the
  routes, EoRR (20, 21).
- `birdc configure` re-enables protocols that were disabled with `birdc disable`
  (static6 came back and was re-announced, byte-identical to 08).

## Not captured

- A GR capability with the Restart State (R) bit or the Forwarding State bits set: bird
  only sets them when started in graceful-restart recovery (`bird -R`), which was not done.
- Long-Lived GR with AFI entries (bird advertised capability 71 empty only).
- NOTIFICATION 3/4 (Attribute Flags Error) / 3/5 (Attribute Length Error): bird 2.0.12
  handles those cases with RFC 7606 treat-as-withdraw instead (35, 36), so it never sent them.
- gobgp: only its OPEN and three UPDATEs (optional part of the brief).

## Files
""")
for x in readme_entries:
    raw_hex = open(f"{OUT}/{x['name']}.hex").read().strip()
    w(f"\n### `{x['name']}.hex`\n\n")
    w(f"- Producer: {x['who']}\n")
    w(f"- Direction: {x['dirn']}\n")
    w(f"- Trigger: {x['trigger']}\n")
    if x.get("note"):
        w(f"- Notes: {x['note']}\n")
    w("\nConfig fragment:\n\n```\n" + x["frag"] + "\n```\n\n")
    w("Hex:\n\n```\n" + raw_hex + "\n```\n\nDecoded:\n\n")
    w("\n".join(x["dec"]) + "\n")
open(f"{OUT}/README.md", "w").write("".join(R))
print("README written", sum(len(r) for r in R))
