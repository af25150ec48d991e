#!/usr/bin/env python3
"""An Exoscale-like metadata service for one guest connection on stdin/stdout.

qemu runs it per connection through user networking's guestfwd (`-cmd:`), so no host socket
is ever opened. Usage: metadata-server.py USER_DATA_FILE [HOSTNAME [URL_PATH=FILE ...]]. Serves
/1.0/user-data (and /latest/user-data) with the file's bytes as they are (gzip or not),
/1.0/meta-data/local-hostname, each URL_PATH with its FILE (an update image, say), 404 for
anything else. A FILE of "@trickle" claims a 1 GiB body and sends one byte a second (a download
that never ends; the script exits once the guest's side is gone). qemu connects stdin, stdout and stderr
all to the guest's socket: requests are logged to the file named by $METADATA_LOG, if any.
"""
import os
import sys
import time

def main():
    user_data = open(sys.argv[1], "rb").read()
    hostname = (sys.argv[2] if len(sys.argv) > 2 else "appliance").encode()
    files = dict(a.split("=", 1) for a in sys.argv[3:])
    rd, wr = sys.stdin.buffer, sys.stdout.buffer
    request = rd.readline().decode("latin-1").strip()
    while rd.readline().strip():
        pass
    parts = request.split()
    path = parts[1] if len(parts) >= 2 else ""
    routes = {
        "/1.0/user-data": user_data,
        "/latest/user-data": user_data,
        "/1.0/meta-data/local-hostname": hostname,
    }
    if files.get(path) == "@trickle":
        wr.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Length: 1073741824\r\nConnection: close\r\n\r\n")
        try:
            while True:
                wr.write(b"\x01")
                wr.flush()
                time.sleep(1)
        except OSError:
            return
    if path in files:
        routes[path] = open(files[path], "rb").read()
    body = routes.get(path)
    status = "200 OK" if body is not None else "404 Not Found"
    body = body if body is not None else b"not found\n"
    log = os.environ.get("METADATA_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{request} -> {status}\n")
    wr.write(f"HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\n"
             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
    wr.write(body)
    wr.flush()

if __name__ == "__main__":
    main()
