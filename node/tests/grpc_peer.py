"""gRPC server and client for node/tests/grpc.rs, on grpcio's generic handlers (bytes in, bytes
out: no .proto, no generated code).

  grpc_peer.py server TAG          serves mesh.Greeter on 127.0.0.1:0, prints "READY <port>"
  grpc_peer.py client ADDR CALLS   calls through ADDR (the meshnode proxy), ten at a time on one
                                   channel, then the other methods; prints one JSON line
  grpc_peer.py unary ADDR CALLS    only unary calls (Work), ten at a time, through ADDR (an
                                   outbound port: the channel's default authority); prints one
                                   JSON line

Methods of mesh.Greeter:
  Hello   unary: answers TAG
  Work    unary: answers TAG after 20 ms (calls overlap however busy the machine is)
  Stream  server streaming: the request is a count N; answers N messages "TAG:i"
  Fail    unary: custom trailer x-custom=yes, then FAILED_PRECONDITION with
          grpc-status-details-bin
  Flaky   unary: UNAVAILABLE on the server tagged B, TAG elsewhere
  Slow    unary: answers TAG after 3 s
"""

import json
import sys
import time
from concurrent import futures

import grpc

DETAILS = b"\x08\x09\x12\x04boom"  # a google.rpc.Status: code 9, message "boom"


def identity(b):
    return b


def serve(tag):
    def hello(request, context):
        return tag.encode()

    def work(request, context):
        time.sleep(0.02)
        return tag.encode()

    def stream(request, context):
        for i in range(int(request.decode() or "0")):
            yield f"{tag}:{i}".encode()

    def fail(request, context):
        context.set_trailing_metadata(
            (("x-custom", "yes"), ("grpc-status-details-bin", DETAILS))
        )
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"refused by {tag}")

    def flaky(request, context):
        if tag == "B":
            context.abort(grpc.StatusCode.UNAVAILABLE, "B is busy")
        return tag.encode()

    def slow(request, context):
        time.sleep(3)
        return tag.encode()

    handlers = {
        "Flaky": grpc.unary_unary_rpc_method_handler(flaky, identity, identity),
        "Slow": grpc.unary_unary_rpc_method_handler(slow, identity, identity),
        "Hello": grpc.unary_unary_rpc_method_handler(hello, identity, identity),
        "Work": grpc.unary_unary_rpc_method_handler(work, identity, identity),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, identity, identity),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, identity, identity),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("mesh.Greeter", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"READY {port}", flush=True)
    # Runs until the test kills it (or its stdin closes).
    sys.stdin.read()
    server.stop(0)


def unary(channel, method):
    return channel.unary_unary(
        f"/mesh.Greeter/{method}",
        request_serializer=identity,
        response_deserializer=identity,
    )


def unary_calls(channel, calls, out, method="Hello"):
    hello = unary(channel, method)
    counts = {}
    failures = 0
    # Ten calls in flight at a time on the one channel (one HTTP/2 connection).
    window = 10
    for start in range(0, calls, window):
        pending = [hello.future(b"hi", timeout=10) for _ in range(min(window, calls - start))]
        for f in pending:
            try:
                tag = f.result().decode()
                counts[tag] = counts.get(tag, 0) + 1
            except grpc.RpcError as e:
                failures += 1
                out.setdefault("first_failure", f"{e.code()} {e.details()}")
    out["unary"] = counts
    out["unary_failures"] = failures


def unary_only(addr, calls):
    out = {}
    channel = grpc.insecure_channel(addr)
    unary_calls(channel, calls, out, "Work")
    channel.close()
    print(json.dumps(out), flush=True)


def client(addr, calls):
    out = {}
    channel = grpc.insecure_channel(addr, options=[("grpc.default_authority", "greeter")])
    unary_calls(channel, calls, out)

    stream = channel.unary_stream(
        "/mesh.Greeter/Stream",
        request_serializer=identity,
        response_deserializer=identity,
    )
    flaky = unary(channel, "Flaky")
    flaky_counts = {}
    for _ in range(20):
        try:
            tag = flaky(b"hi", timeout=10).decode()
            flaky_counts[tag] = flaky_counts.get(tag, 0) + 1
        except grpc.RpcError as e:
            flaky_counts[e.code().name] = flaky_counts.get(e.code().name, 0) + 1
    out["flaky"] = flaky_counts

    msgs = [m.decode() for m in stream(b"50", timeout=10)]
    out["stream_count"] = len(msgs)
    out["stream_one_endpoint"] = len({m.split(":")[0] for m in msgs}) == 1
    out["stream_in_order"] = [int(m.split(":")[1]) for m in msgs] == list(range(50))

    try:
        unary(channel, "Fail")(b"x", timeout=10)
        out["fail"] = "no error"
    except grpc.RpcError as e:
        trailers = dict(e.trailing_metadata() or ())
        out["fail"] = {
            "code": e.code().name,
            "details": e.details(),
            "custom": trailers.get("x-custom"),
            "status_details": (trailers.get("grpc-status-details-bin") or b"").hex(),
        }
    channel.close()

    other = grpc.insecure_channel(addr, options=[("grpc.default_authority", "nosuch")])
    try:
        unary(other, "Hello")(b"hi", timeout=10)
        out["unknown"] = "answered"
    except grpc.RpcError as e:
        out["unknown"] = {"code": e.code().name, "details": e.details()}
    other.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(sys.argv[2])
    elif sys.argv[1] == "unary":
        unary_only(sys.argv[2], int(sys.argv[3]))
    else:
        client(sys.argv[2], int(sys.argv[3]))
