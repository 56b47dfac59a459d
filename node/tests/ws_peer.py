"""WebSocket server and client for node/tests/websocket.rs, on the `websockets` library.

  ws_peer.py server TAG [reject]   serves on 127.0.0.1:0, prints "READY <port>", runs until
                                   stdin closes; with `reject` every handshake is answered
                                   426 with a text body
  ws_peer.py client PROXY SERVICE FORM MESSAGES CONNECTIONS
                                   opens CONNECTIONS WebSockets to SERVICE one after another
                                   through the meshnode proxy at PROXY (host:port) and prints
                                   one JSON line. FORM says how the proxy is asked:
                                     origin     GET /chat with Host: SERVICE
                                     absolute   GET http://SERVICE/chat (as HTTP_PROXY clients)
                                     connect:P  CONNECT SERVICE:P, then the handshake inside

Messages the server understands:
  "whoami"    answered with TAG
  "burst N"   answered with N messages "TAG:i", pushed by the server
  anything    echoed (text or binary)
"""

import asyncio
import json
import socket
import sys

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus


async def run_server(tag, reject):
    async def handler(ws):
        async for msg in ws:
            if msg == "whoami":
                await ws.send(tag)
            elif isinstance(msg, str) and msg.startswith("burst "):
                for i in range(int(msg.split()[1])):
                    await ws.send(f"{tag}:{i}")
            else:
                await ws.send(msg)

    def process_request(connection, request):
        if reject:
            return connection.respond(426, f"no WebSocket on {tag}\n")
        return None

    async with serve(handler, "127.0.0.1", 0, process_request=process_request) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"READY {port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def absolute_form(service):
    """Makes the client write its request line in absolute form."""
    original = ClientProtocol.connect

    def connect_absolute(self):
        request = original(self)
        request.path = f"http://{service}{request.path}"
        return request

    ClientProtocol.connect = connect_absolute


async def one(proxy, service, form, messages):
    host, port = proxy.rsplit(":", 1)
    if form.startswith("connect:"):
        target = form.split(":", 1)[1]
        ws = await connect(
            f"ws://{service}:{target}/chat", proxy=f"http://{proxy}", open_timeout=10
        )
    else:
        sock = socket.create_connection((host, int(port)), timeout=10)
        ws = await connect(f"ws://{service}/chat", sock=sock, open_timeout=10, proxy=None)
    async with ws:
        await ws.send("whoami")
        tag = await asyncio.wait_for(ws.recv(), 10)
        # Client to server and back: text and binary of growing size, each echoed in order.
        for i in range(messages):
            sent = f"m{i}:" + "x" * (i * 37) if i % 2 else bytes([i % 256]) * (i * 53 + 1)
            await ws.send(sent)
            got = await asyncio.wait_for(ws.recv(), 10)
            if got != sent:
                raise RuntimeError(f"message {i} came back different")
        # Server to client, unprompted.
        await ws.send(f"burst {messages}")
        for i in range(messages):
            got = await asyncio.wait_for(ws.recv(), 10)
            if got != f"{tag}:{i}":
                raise RuntimeError(f"pushed message {i} is {got!r}")
    return tag


async def run_client(proxy, service, form, messages, connections):
    if form == "absolute":
        absolute_form(service)
    out = {"tags": {}, "ok": 0, "failures": 0, "errors": [], "statuses": []}
    for _ in range(connections):
        try:
            tag = await asyncio.wait_for(one(proxy, service, form, messages), 60)
            out["tags"][tag] = out["tags"].get(tag, 0) + 1
            out["ok"] += 1
        except InvalidStatus as e:
            out["failures"] += 1
            out["statuses"].append(e.response.status_code)
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["failures"] += 1
            if len(out["errors"]) < 5:
                out["errors"].append(f"{type(e).__name__}: {e}")
    print(json.dumps(out), flush=True)


def main():
    if sys.argv[1] == "server":
        asyncio.run(run_server(sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "reject"))
    else:
        proxy, service, form, messages, connections = sys.argv[2:7]
        asyncio.run(run_client(proxy, service, form, int(messages), int(connections)))


if __name__ == "__main__":
    main()
