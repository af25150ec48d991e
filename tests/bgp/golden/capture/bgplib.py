"""Minimal BGP speaker for capturing bird's wire messages (scratch tool)."""
import json, socket, struct, subprocess, threading, time

MARKER = b"\xff" * 16
TYPES = {1: "OPEN", 2: "UPDATE", 3: "NOTIFICATION", 4: "KEEPALIVE", 5: "ROUTE-REFRESH"}


def msg(typ, body=b""):
    return MARKER + struct.pack("!HB", 19 + len(body), typ) + body


def cap(code, val=b""):
    return struct.pack("!BB", code, len(val)) + val


def open_msg(asn, hold, bgp_id, caps):
    """caps: list of capability TLV bytes; each put in its own optional param 2."""
    params = b"".join(struct.pack("!BB", 2, len(c)) + c for c in caps)
    my_as = asn if asn <= 0xFFFF else 23456
    body = struct.pack("!BHH4sB", 4, my_as, hold, socket.inet_aton(bgp_id), len(params)) + params
    return msg(1, body)


def attr(flags, typ, val):
    if len(val) > 255:
        flags |= 0x10
    if flags & 0x10:
        return struct.pack("!BBH", flags, typ, len(val)) + val
    return struct.pack("!BBB", flags, typ, len(val)) + val


def pfx4(p):
    net, plen = p.split("/")
    plen = int(plen)
    return bytes([plen]) + socket.inet_aton(net)[: (plen + 7) // 8]


def update(withdrawn=b"", attrs=b"", nlri=b""):
    body = struct.pack("!H", len(withdrawn)) + withdrawn + struct.pack("!H", len(attrs)) + attrs + nlri
    return msg(2, body)


class Peer:
    def __init__(self, name, local_ip, remote_ip="127.0.0.1", port=179, log=None):
        self.name = name
        self.local_ip = local_ip
        self.remote_ip = remote_ip
        self.port = port
        self.log = log if log is not None else []
        self.rx = []
        self.cv = threading.Condition()
        self.lock = threading.Lock()
        self.closed = False
        self.sock = None
        self.ka_stop = threading.Event()

    def connect(self, retries=40):
        last = None
        for _ in range(retries):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.local_ip, 0))
            s.settimeout(2)
            try:
                s.connect((self.remote_ip, self.port))
                s.settimeout(None)
                self.sock = s
                self.closed = False
                threading.Thread(target=self._reader, daemon=True).start()
                return
            except OSError as e:
                last = e
                s.close()
                time.sleep(0.5)
        raise RuntimeError(f"{self.name}: connect failed: {last}")

    def _recvn(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _reader(self):
        try:
            while True:
                hdr = self._recvn(19)
                ln = struct.unpack("!H", hdr[16:18])[0]
                body = self._recvn(ln - 19) if ln > 19 else b""
                raw = hdr + body
                with self.cv:
                    ent = {"peer": self.name, "dir": "rx", "t": time.time(),
                           "type": TYPES.get(raw[18], str(raw[18])), "hex": raw.hex()}
                    self.rx.append(ent)
                    self.log.append(ent)
                    self.cv.notify_all()
        except (EOFError, OSError):
            pass
        with self.cv:
            self.closed = True
            self.log.append({"peer": self.name, "dir": "event", "t": time.time(), "type": "TCP-CLOSED"})
            self.cv.notify_all()

    def send(self, raw, note=""):
        with self.lock:
            self.sock.sendall(raw)
        self.log.append({"peer": self.name, "dir": "tx", "t": time.time(),
                         "type": TYPES.get(raw[18], str(raw[18])), "hex": raw.hex(), "note": note})

    def wait_for(self, pred, timeout=30, start=0):
        """Wait for an rx message (index >= start) matching pred; return it."""
        end = time.time() + timeout
        with self.cv:
            while True:
                for m in self.rx[start:]:
                    if pred(m):
                        return m
                rem = end - time.time()
                if rem <= 0:
                    return None
                if self.closed:
                    # still allow a final check done above
                    return None
                self.cv.wait(rem)

    def wait_type(self, typ, timeout=30, start=0):
        return self.wait_for(lambda m: m["type"] == typ, timeout, start)

    def start_keepalives(self, interval=5):
        self.ka_stop.clear()

        def run():
            while not self.ka_stop.wait(interval):
                if self.closed:
                    return
                try:
                    self.send(msg(4), "periodic keepalive")
                except OSError:
                    return
        threading.Thread(target=run, daemon=True).start()

    def close(self):
        self.ka_stop.set()
        try:
            self.sock.close()
        except Exception:
            pass


def birdc(sock, *args):
    r = subprocess.run(["birdc", "-s", sock] + list(args), capture_output=True, text=True, timeout=20)
    return r.stdout + r.stderr


def dump(log, path):
    with open(path, "w") as f:
        json.dump(log, f, indent=1)
