"""Independent BGP message decoder used to document the golden vectors.
Every length field is checked against the bytes actually present."""
import socket, struct

TYPES = {1: "OPEN", 2: "UPDATE", 3: "NOTIFICATION", 4: "KEEPALIVE", 5: "ROUTE-REFRESH"}
AFI = {1: "IPv4", 2: "IPv6"}
SAFI = {1: "unicast"}
CAPS = {1: "Multiprotocol Extensions", 2: "Route Refresh", 5: "Extended Next Hop Encoding",
        64: "Graceful Restart", 65: "4-octet AS number", 69: "ADD-PATH", 70: "Enhanced Route Refresh",
        71: "Long-Lived Graceful Restart", 73: "FQDN (hostname)"}
ATTRS = {1: "ORIGIN", 2: "AS_PATH", 3: "NEXT_HOP", 4: "MULTI_EXIT_DISC", 5: "LOCAL_PREF",
         8: "COMMUNITIES", 9: "ORIGINATOR_ID", 10: "CLUSTER_LIST", 14: "MP_REACH_NLRI", 15: "MP_UNREACH_NLRI"}
# RFC 4271 5 / RFC 4456 / RFC 4760 / RFC 1997: Optional, Transitive, Partial bits
EXPECTED_FLAGS = {1: 0x40, 2: 0x40, 3: 0x40, 5: 0x40, 4: 0x80, 9: 0x80, 10: 0x80, 14: 0x80, 15: 0x80, 8: 0xc0}
NOTIF = {1: "Message Header Error", 2: "OPEN Message Error", 3: "UPDATE Message Error",
         4: "Hold Timer Expired", 5: "FSM Error", 6: "Cease"}
NSUB = {(1, 1): "Connection Not Synchronized", (1, 2): "Bad Message Length", (1, 3): "Bad Message Type",
        (2, 1): "Unsupported Version Number", (3, 1): "Malformed Attribute List",
        (3, 4): "Attribute Flags Error", (3, 5): "Attribute Length Error",
        (6, 2): "Administrative Shutdown", (6, 4): "Administrative Reset"}


class DecodeError(Exception):
    pass


def need(cond, what):
    if not cond:
        raise DecodeError(what)


def hx(b):
    return b.hex() if b else "(empty)"


def afisafi(afi, safi):
    return f"AFI {afi} ({AFI.get(afi, '?')}) / SAFI {safi} ({SAFI.get(safi, '?')})"


def prefixes(b, afi, addpath, out, indent):
    i = 0
    while i < len(b):
        pid = None
        if addpath:
            need(i + 4 <= len(b), "truncated path id")
            pid = struct.unpack("!I", b[i:i + 4])[0]
            i += 4
        need(i < len(b), "truncated prefix length")
        plen = b[i]
        nb = (plen + 7) // 8
        need(plen <= (32 if afi == 1 else 128), "prefix length too long")
        need(i + 1 + nb <= len(b), "truncated prefix")
        raw = b[i + 1:i + 1 + nb]
        full = raw + b"\x00" * ((4 if afi == 1 else 16) - nb)
        addr = socket.inet_ntop(socket.AF_INET if afi == 1 else socket.AF_INET6, full)
        s = f"{addr}/{plen}"
        enc = b[i:i + 1 + nb]
        if pid is not None:
            out.append(f"{indent}- path ID {pid} (`{b[i-4:i].hex()}`), prefix {s} (`{enc.hex()}`: length byte {plen}, {nb} address byte(s))")
        else:
            out.append(f"{indent}- {s} (`{enc.hex()}`: length byte {plen}, {nb} address byte(s))")
        i += 1 + nb


def flags_s(f):
    parts = []
    parts.append("Optional" if f & 0x80 else "Well-known")
    parts.append("Transitive" if f & 0x40 else "Non-transitive")
    if f & 0x20:
        parts.append("Partial")
    if f & 0x10:
        parts.append("Extended-Length")
    if f & 0x0f:
        parts.append(f"low bits {f & 0x0f:#x}")
    return f"0x{f:02x} (" + ", ".join(parts) + ")"


def decode_attr(t, v, addpath, out, ind):
    if t == 1:
        need(len(v) == 1, f"ORIGIN must have length 1, has {len(v)} (value `{v.hex()}`)")
        out.append(f"{ind}value: {v[0]} = {['IGP', 'EGP', 'INCOMPLETE'][v[0]] if v[0] < 3 else '?'}")
    elif t == 2:
        if not v:
            out.append(f"{ind}value: empty AS_PATH (no segments; iBGP-originated)")
        i = 0
        while i < len(v):
            need(i + 2 <= len(v), "AS_PATH seg hdr")
            st, n = v[i], v[i + 1]
            need(i + 2 + 4 * n <= len(v), "AS_PATH seg")
            asns = struct.unpack(f"!{n}I", v[i + 2:i + 2 + 4 * n])
            out.append(f"{ind}segment type {st} ({ {1:'AS_SET',2:'AS_SEQUENCE'}.get(st,'?') }), {n} x 4-octet ASN: {list(asns)}")
            i += 2 + 4 * n
    elif t in (3, 9):
        need(len(v) == 4, "len 4")
        out.append(f"{ind}value: {socket.inet_ntoa(v)}")
    elif t in (4, 5):
        need(len(v) == 4, "len 4")
        out.append(f"{ind}value: {struct.unpack('!I', v)[0]}")
    elif t == 8:
        need(len(v) % 4 == 0, "communities")
        cs = [f"({struct.unpack('!HH', v[i:i+4])[0]},{struct.unpack('!HH', v[i:i+4])[1]})" for i in range(0, len(v), 4)]
        out.append(f"{ind}value: {', '.join(cs)}")
    elif t == 10:
        need(len(v) % 4 == 0, "cluster list")
        out.append(f"{ind}value: [{', '.join(socket.inet_ntoa(v[i:i+4]) for i in range(0, len(v), 4))}]")
    elif t == 14:
        need(len(v) >= 5, "MP_REACH short")
        afi, safi, nhl = struct.unpack("!HBB", v[:4])
        need(5 + nhl <= len(v), "MP_REACH nh")
        nh = v[4:4 + nhl]
        out.append(f"{ind}AFI/SAFI: `{v[:3].hex()}` = {afisafi(afi, safi)}")
        nhs = []
        for j in range(0, nhl, 16 if afi == 2 else 4):
            fam = socket.AF_INET6 if afi == 2 else socket.AF_INET
            nhs.append(socket.inet_ntop(fam, nh[j:j + (16 if afi == 2 else 4)]))
        out.append(f"{ind}next hop length: {nhl}; next hop: `{nh.hex()}` = {', '.join(nhs)}")
        out.append(f"{ind}reserved (SNPA count): {v[4 + nhl]}")
        out.append(f"{ind}NLRI ({len(v) - 5 - nhl} bytes):")
        prefixes(v[5 + nhl:], afi, addpath, out, "    ")
    elif t == 15:
        need(len(v) >= 3, "MP_UNREACH short")
        afi, safi = struct.unpack("!HB", v[:3])
        out.append(f"{ind}AFI/SAFI: `{v[:3].hex()}` = {afisafi(afi, safi)}")
        if len(v) == 3:
            out.append(f"{ind}withdrawn NLRI: none (this is the End-of-RIB marker for that AFI/SAFI, RFC 4724)")
        else:
            out.append(f"{ind}withdrawn NLRI ({len(v) - 3} bytes):")
            prefixes(v[3:], afi, addpath, out, "    ")
    else:
        out.append(f"{ind}value: `{hx(v)}`")


def decode(raw, addpath=False, lenient=False):
    out = []
    try:
        return _decode(raw, addpath, lenient, out)
    except DecodeError as e:
        if not lenient:
            raise
        out.append(f"- **Decoding stops here: {e}** (this is the deliberate defect)")
        return out


def _decode(raw, addpath, lenient, out):
    need(len(raw) >= 19, "shorter than header")
    need(raw[:16] == b"\xff" * 16, "bad marker")
    ln, typ = struct.unpack("!HB", raw[16:19])
    out.append(f"- Marker: 16 x `ff`")
    out.append(f"- Length: {ln} (`{raw[16:18].hex()}`); bytes in file: {len(raw)}")
    out.append(f"- Type: {typ} ({TYPES.get(typ, 'unknown')})")
    if lenient and (ln != len(raw) or typ not in TYPES):
        out.append("- (deliberately malformed; body not decoded further)")
        if len(raw) > 19:
            out.append(f"- Body bytes: `{raw[19:].hex()}`")
        return out
    need(ln == len(raw), f"length field {ln} != {len(raw)}")
    b = raw[19:]
    if typ == 1:
        ver, myas, hold, bid, opl = struct.unpack("!BHH4sB", b[:10])
        out.append(f"- Version: {ver}")
        out.append(f"- My Autonomous System: {myas} (`{b[1:3].hex()}`){' = AS_TRANS' if myas == 23456 else ''}")
        out.append(f"- Hold Time: {hold} s")
        out.append(f"- BGP Identifier: {socket.inet_ntoa(bid)}")
        out.append(f"- Optional Parameters Length: {opl}")
        need(10 + opl == len(b), "opt param len")
        i = 10
        while i < len(b):
            pt, pl = b[i], b[i + 1]
            need(i + 2 + pl <= len(b), "param overrun")
            out.append(f"- Optional Parameter type {pt} ({'Capabilities' if pt == 2 else '?'}), length {pl}:")
            pv = b[i + 2:i + 2 + pl]
            j = 0
            while pt == 2 and j < len(pv):
                cc, cl = pv[j], pv[j + 1]
                need(j + 2 + cl <= len(pv), "cap overrun")
                cv = pv[j + 2:j + 2 + cl]
                d = f"  - Capability {cc} ({CAPS.get(cc, 'unknown')}), length {cl}, value `{hx(cv)}`"
                if cc == 1:
                    afi, _, safi = struct.unpack("!HBB", cv)
                    d += f": {afisafi(afi, safi)}"
                elif cc == 65:
                    d += f": AS {struct.unpack('!I', cv)[0]}"
                elif cc == 64:
                    fl = struct.unpack("!H", cv[:2])[0]
                    d += f": restart flags {fl >> 12:#x} (R={fl >> 15 & 1}, N={fl >> 14 & 1}), restart time {fl & 0xfff} s"
                    afs = [f"{afisafi(*struct.unpack('!HB', cv[k:k+3]))} forwarding-state flags {cv[k+3]:#04x}" for k in range(2, cl, 4)]
                    d += ("; " + "; ".join(afs)) if afs else "; no AFI/SAFI entries (restart-aware only)"
                elif cc == 69:
                    afs = []
                    for k in range(0, cl, 4):
                        afi, safi, sr = struct.unpack("!HBB", cv[k:k + 4])
                        afs.append(f"{afisafi(afi, safi)} send/receive={sr} ({ {1:'receive',2:'send',3:'send+receive'}.get(sr,'?') })")
                    d += ": " + "; ".join(afs)
                elif cc == 5:
                    afs = []
                    for k in range(0, cl, 6):
                        a, s, n = struct.unpack("!HHH", cv[k:k + 6])
                        afs.append(f"NLRI AFI {a} SAFI {s} with next-hop AFI {n}")
                    d += ": " + "; ".join(afs)
                elif cc == 73:
                    hl = cv[0]
                    d += f": hostname '{cv[1:1+hl].decode()}' (len {hl}), domain '{cv[2+hl:2+hl+cv[1+hl]].decode()}' (len {cv[1+hl]})"
                elif cc in (2, 70, 71) and cl == 0:
                    d += ": (no value)" + ("; no AFI/SAFI entries" if cc == 71 else "")
                out.append(d)
                j += 2 + cl
            i += 2 + pl
    elif typ == 2:
        need(len(b) >= 2, "withdrawn len")
        wl = struct.unpack("!H", b[:2])[0]
        need(2 + wl + 2 <= len(b), f"Withdrawn Routes Length {wl} (`{b[:2].hex()}`) but only {len(b) - 2} byte(s) follow it in the message body")
        out.append(f"- Withdrawn Routes Length: {wl}")
        if wl:
            out.append("- Withdrawn Routes:")
            prefixes(b[2:2 + wl], 1, addpath, out, "  ")
        al = struct.unpack("!H", b[2 + wl:4 + wl])[0]
        need(4 + wl + al <= len(b), "attr overrun")
        out.append(f"- Total Path Attribute Length: {al}")
        a = b[4 + wl:4 + wl + al]
        i = 0
        while i < len(a):
            fl, t = a[i], a[i + 1]
            if fl & 0x10:
                vl = struct.unpack("!H", a[i + 2:i + 4])[0]
                h = 4
            else:
                vl = a[i + 2]
                h = 3
            need(i + h + vl <= len(a), f"attribute header `{a[i:i+h].hex()}` (flags {fl:#04x}, type {t} {ATTRS.get(t, '')}) claims {vl} value byte(s) but only {len(a) - i - h} remain in the {al}-byte path attribute block")
            v = a[i + h:i + h + vl]
            out.append(f"- Path attribute `{a[i:i+h].hex()}` + {vl} value byte(s): flags {flags_s(fl)}, type {t} ({ATTRS.get(t, 'unknown')}), length {vl}")
            try:
                exp = EXPECTED_FLAGS.get(t)
                need(exp is None or (fl & 0xe0) == exp,
                     f"flags {fl:#04x} wrong for {ATTRS.get(t)}: the Optional/Transitive/Partial bits must be {exp:#04x}" if exp is not None else "")
                decode_attr(t, v, addpath, out, "  - ")
            except DecodeError as e:
                if not lenient:
                    raise
                out.append(f"  - **Deliberate defect: {e}**")
            i += h + vl
        nl = b[4 + wl + al:]
        if wl == 0 and al == 0 and not nl:
            out.append("- (no withdrawn routes, no attributes, no NLRI: IPv4 unicast End-of-RIB marker, RFC 4724)")
        out.append(f"- NLRI ({len(nl)} bytes):" + ("" if nl else " none"))
        prefixes(nl, 1, addpath, out, "  ")
        out.append(f"- Length check: 19 + 2 + {wl} + 2 + {al} + {len(nl)} = {19 + 4 + wl + al + len(nl)}")
        need(19 + 4 + wl + al + len(nl) == ln, "sum")
    elif typ == 3:
        c, s = b[0], b[1]
        out.append(f"- Error Code: {c} ({NOTIF.get(c, '?')})")
        out.append(f"- Error Subcode: {s} ({NSUB.get((c, s), '?')})")
        d = b[2:]
        if not d:
            out.append("- Data: none")
        elif c == 6 and s in (2, 4):
            need(d[0] == len(d) - 1, "shutdown comm length")
            out.append(f"- Data: `{d.hex()}` = Shutdown Communication (RFC 9003): length {d[0]}, UTF-8 \"{d[1:].decode()}\"")
        else:
            out.append(f"- Data ({len(d)} bytes): `{d.hex()}`")
    elif typ == 5:
        afi, st, safi = struct.unpack("!HBB", b)
        out.append(f"- AFI: {afi} ({AFI.get(afi)})")
        out.append(f"- Message Subtype (RFC 7313; 'Reserved' in RFC 2918): {st} ({ {0:'normal route refresh request',1:'BoRR (Beginning of Route Refresh)',2:'EoRR (End of Route Refresh)'}.get(st,'?') })")
        out.append(f"- SAFI: {safi} ({SAFI.get(safi)})")
    elif typ == 4:
        need(not b, "keepalive body")
        out.append("- (no body)")
    return out
