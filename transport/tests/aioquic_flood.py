#!/usr/bin/env python3
"""A pool of independent QUIC clients (aioquic) that handshake with a node again and again with
no client certificate or a foreign CA's, as a host that can reach the node's port might. Driven
by transport/tests/handshake_flood.rs.

usage: aioquic_flood.py HOST PORT SECONDS CLIENTS SOURCES FOREIGN_CERT FOREIGN_KEY
Client i binds 127.0.1.(1 + i % SOURCES), so that the node sees several source addresses.
Prints "STARTED" once the pool runs, then "AIOQUIC done" with the outcomes as key=value pairs,
and exits 0.
"""

import asyncio
import socket
import ssl
import sys
import time

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

ATTEMPT_TIMEOUT = 2.0


def configuration(foreign: tuple[str, str] | None) -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=["meshnode/1"])
    # An attacker does not care who the node is.
    config.verify_mode = ssl.CERT_NONE
    config.server_name = "node-b"
    config.idle_timeout = ATTEMPT_TIMEOUT
    if foreign is not None:
        config.load_cert_chain(foreign[0], foreign[1])
    return config


async def attempt(target, source: str, config: QuicConfiguration, counts: dict) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: QuicConnectionProtocol(QuicConnection(configuration=config)), sock=sock
    )
    try:
        protocol.connect(target)
        counts["attempts"] += 1
        try:
            await asyncio.wait_for(protocol.wait_connected(), ATTEMPT_TIMEOUT)
        except asyncio.TimeoutError:
            counts["timed_out"] += 1
            return
        except ConnectionError:
            counts["refused"] += 1
            return
        # TLS 1.3: the client finishes before the server has checked its certificate; the
        # node's refusal arrives as the connection's close.
        counts["client_completed"] += 1
        try:
            await asyncio.wait_for(protocol.wait_closed(), ATTEMPT_TIMEOUT)
            counts["closed_by_node"] += 1
        except asyncio.TimeoutError:
            counts["left_open"] += 1
    finally:
        protocol.close()
        transport.close()


async def client(i, target, sources, config, deadline, counts) -> None:
    source = f"127.0.1.{1 + i % sources}"
    while time.monotonic() < deadline:
        try:
            await attempt(target, source, config, counts)
        except OSError as e:
            counts["errors"] += 1
            print(f"aioquic_flood: {e}", file=sys.stderr)
            await asyncio.sleep(0.05)


async def main() -> None:
    host, port, seconds, clients, sources, cert, key = sys.argv[1:8]
    target = (host, int(port))
    configs = [configuration(None), configuration((cert, key))]
    counts = {
        k: 0
        for k in (
            "attempts",
            "client_completed",
            "closed_by_node",
            "left_open",
            "refused",
            "timed_out",
            "errors",
        )
    }
    deadline = time.monotonic() + float(seconds)
    tasks = [
        asyncio.create_task(
            client(i, target, int(sources), configs[i % 2], deadline, counts)
        )
        for i in range(int(clients))
    ]
    print("STARTED", flush=True)
    await asyncio.gather(*tasks)
    print("AIOQUIC done " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
