#!/usr/bin/env python3
"""An independent HTTP/3 client (aioquic) opening a standard CONNECT tunnel (RFC 9114 4.4)
through a meshnode node. Driven by node/tests/h3_interop.rs.

usage: h3_connect.py HOST PORT CA CERT KEY EXPECTED_NODE AUTHORITY
Sends 64 KiB, half-closes, expects the same bytes back (a TCP echo service).
Prints "OK" and exits 0 on success; prints the reason and exits 1 otherwise.
"""

import asyncio
import ssl
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent
from cryptography import x509


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.status = asyncio.get_running_loop().create_future()
        self.data = bytearray()
        self.done = asyncio.get_running_loop().create_future()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            reason = f"connection closed: code {event.error_code} {event.reason_phrase!r}"
            for f in (self.status, self.done):
                if not f.done():
                    f.set_exception(ConnectionError(reason))
                    f.exception()  # awaited later or not at all: no "never retrieved" noise
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                status = dict(ev.headers).get(b":status", b"?").decode()
                if not self.status.done():
                    self.status.set_result(status)
                if ev.stream_ended and not self.done.done():
                    self.done.set_result(True)
            elif isinstance(ev, DataReceived):
                self.data.extend(ev.data)
                if ev.stream_ended and not self.done.done():
                    self.done.set_result(True)


def check_peer(client: Client, ca_path: str, expected: str) -> None:
    """Chain and SPIFFE ID of the node: aioquic's own check wants a DNS name or an IP."""
    der = client._quic.tls._peer_certificate
    if der is None:
        raise RuntimeError("no server certificate")
    ca = x509.load_pem_x509_certificate(open(ca_path, "rb").read())
    peer = der if isinstance(der, x509.Certificate) else x509.load_der_x509_certificate(der)
    peer.verify_directly_issued_by(ca)
    uris = peer.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    if not any(u.endswith("/node/" + expected) for u in uris):
        raise RuntimeError(f"server is {uris}, not {expected}")


async def main() -> int:
    host, port, ca, cert, key, expected, authority = sys.argv[1:8]
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
    config.verify_mode = ssl.CERT_NONE  # checked by check_peer against the mesh CA
    config.load_cert_chain(cert, key)
    payload = bytes(i % 251 for i in range(64 * 1024))
    async with connect(host, int(port), configuration=config, create_protocol=Client) as client:
        check_peer(client, ca, expected)
        sid = client._quic.get_next_available_stream_id()
        client.h3.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", authority.encode())])
        client.transmit()
        status = await asyncio.wait_for(client.status, 10)
        if status != "200":
            print(f"CONNECT answered {status}")
            return 1
        client.h3.send_data(sid, payload, end_stream=True)
        client.transmit()
        await asyncio.wait_for(client.done, 10)
        if bytes(client.data) != payload:
            print(f"echo differs: {len(client.data)} bytes back")
            return 1
    print("OK")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(asyncio.wait_for(main(), 20)))
    except Exception as e:  # the Rust test reads the reason
        print(f"FAILED: {type(e).__name__}: {e}")
        sys.exit(1)
