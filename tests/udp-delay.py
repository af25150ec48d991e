#!/usr/bin/env python3
"""A UDP forwarder that adds delay, for the lab's "internet" (the kernel here has no netem).

    udp-delay.py DELAY_MS LISTEN_ADDR PORT=TARGET_ADDR:TARGET_PORT [PORT=...]

Listens on LISTEN_ADDR:PORT for each mapping; every client (source address and port) gets
its own upstream socket to the target, so the target sees one flow per client. Each datagram
is held DELAY_MS in each direction (the round trip grows by twice that). The lab sends the
relays' WireGuard UDP here with a DNAT per gateway endpoint and port; conntrack turns the
replies back into the endpoints' addresses. Runs until killed.
"""
import asyncio
import sys


class Upstream(asyncio.DatagramProtocol):
    def __init__(self, front, client, delay):
        self.front, self.client, self.delay = front, client, delay
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        loop = asyncio.get_running_loop()
        loop.call_later(self.delay, self.front.sendto, data, self.client)


class Front(asyncio.DatagramProtocol):
    def __init__(self, target, delay):
        self.target, self.delay = target, delay
        self.flows = {}
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, client):
        loop = asyncio.get_running_loop()
        up = self.flows.get(client)
        if up is None:
            up = Upstream(self.transport, client, self.delay)
            self.flows[client] = up
            loop.create_task(self.open(up, data))
            return
        if up.transport is not None:
            loop.call_later(self.delay, up.transport.sendto, data)

    async def open(self, up, first):
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: up, remote_addr=self.target)
        loop.call_later(self.delay, up.transport.sendto, first)


async def main():
    delay = int(sys.argv[1]) / 1000.0
    listen = sys.argv[2]
    loop = asyncio.get_running_loop()
    for m in sys.argv[3:]:
        port, target = m.split("=")
        host, tport = target.rsplit(":", 1)
        await loop.create_datagram_endpoint(
            lambda t=(host, int(tport)): Front(t, delay), local_addr=(listen, int(port))
        )
    await asyncio.Event().wait()


asyncio.run(main())
