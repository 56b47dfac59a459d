"""gRPC server and client for node/tests/grpc.rs, on grpcio's generic handlers (bytes in, bytes
out: no .proto, no generated code).

  grpc_peer.py server TAG          serves mesh.Greeter on 127.0.0.1:0, prints "READY <port>"
  grpc_peer.py client ADDR CALLS   calls through ADDR (the meshnode proxy), ten at a time on one
                                   channel, then the other methods; prints one JSON line
  grpc_peer.py unary ADDR CALLS    only unary calls (Work), ten at a time, through ADDR (an
                                   outbound port: the channel's default authority); prints one
                                   JSON line
  grpc_peer.py loop ADDR WORKERS   unary calls (Hello) back to back from WORKERS threads on one
                                   channel through ADDR (the proxy), until stdin says "stop";
                                   prints "BOTH" once B and C have both answered; stdin
                                   "killed T" marks the time (time.time()) a node was killed;
                                   at "stop" prints one JSON line (failures before and after
                                   T + 1 s, worst call latency, answers by tag)
  grpc_peer.py cancel ADDR SERVER...
                                   calls Hold and Park through ADDR (the proxy) and cancels
                                   them, and calls Hold with a 1 s deadline; asks the servers
                                   (directly, at SERVER...) when each call ended there; prints
                                   one JSON line
  grpc_peer.py orphan ADDR SERVER...
                                   calls Hold through ADDR, prints "STARTED" once a server has
                                   it; after a line on stdin (the caller's node was killed)
                                   prints one JSON line: when the call ended at the server,
                                   counted from that line

Methods of mesh.Greeter:
  Hello   unary: answers TAG
  Work    unary: answers TAG after 20 ms (calls overlap however busy the machine is)
  Stream  server streaming: the request is a count N; answers N messages "TAG:i"
  Fail    unary: custom trailer x-custom=yes, then FAILED_PRECONDITION with
          grpc-status-details-bin
  Flaky   unary: UNAVAILABLE on the server tagged B, TAG elsewhere
  Slow    unary: answers TAG after 3 s
  Hold    unary: the request is a call id; waits until the call ends (cancelled, deadline) or
          30 s pass, then answers TAG
  Park    server streaming: the request is a call id; sends one message, then waits like Hold
  Ended   unary: the request is a call id; answers JSON {"started", "ended", "cancelled"}
          (time.monotonic() on this machine, null until then) of that Hold or Park call
"""

import json
import sys
import threading
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

    # Hold and Park calls by id: when each started and ended on this server.
    calls = {}
    lock = threading.Lock()

    def wait_for_end(request, context):
        call = request.decode()
        finished = threading.Event()

        def done():
            # Runs when the call ends: "cancelled" if that was before the handler let go.
            with lock:
                calls[call]["ended"] = time.monotonic()
                calls[call]["cancelled"] = calls[call].pop("waiting", False)
            finished.set()

        with lock:
            calls[call] = {"started": time.monotonic(), "ended": None, "cancelled": None}
            calls[call]["waiting"] = True
        context.add_callback(done)
        finished.wait(30)
        with lock:
            calls[call].pop("waiting", None)

    def hold(request, context):
        wait_for_end(request, context)
        return tag.encode()

    def park(request, context):
        yield f"{tag}:parked".encode()
        wait_for_end(request, context)

    def ended(request, context):
        with lock:
            seen = dict(calls.get(request.decode()) or {})
        seen.pop("waiting", None)
        return json.dumps(seen or None).encode()

    handlers = {
        "Hold": grpc.unary_unary_rpc_method_handler(hold, identity, identity),
        "Park": grpc.unary_stream_rpc_method_handler(park, identity, identity),
        "Ended": grpc.unary_unary_rpc_method_handler(ended, identity, identity),
        "Flaky": grpc.unary_unary_rpc_method_handler(flaky, identity, identity),
        "Slow": grpc.unary_unary_rpc_method_handler(slow, identity, identity),
        "Hello": grpc.unary_unary_rpc_method_handler(hello, identity, identity),
        "Work": grpc.unary_unary_rpc_method_handler(work, identity, identity),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, identity, identity),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, identity, identity),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
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


def call_loop(addr, workers):
    """Calls back to back on one channel until told to stop; see the module notes."""
    channel = grpc.insecure_channel(addr, options=[("grpc.default_authority", "greeter")])
    hello = unary(channel, "Hello")
    lock = threading.Lock()
    done = threading.Event()
    # (started, latency, tag or status code name) of every call.
    results = []
    both = threading.Event()

    def worker():
        while not done.is_set():
            start = time.time()
            t0 = time.monotonic()
            try:
                answer = hello(b"hi", timeout=10).decode()
            except grpc.RpcError as e:
                answer = e.code().name
            took = time.monotonic() - t0
            with lock:
                results.append((start, took, answer))
                if not both.is_set() and {"B", "C"} <= {r[2] for r in results[-50:]}:
                    both.set()
                    print("BOTH", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    killed = None
    for line in sys.stdin:
        word = line.split()
        if word and word[0] == "killed":
            killed = float(word[1])
        elif word and word[0] == "stop":
            break
    done.set()
    for t in threads:
        t.join()
    channel.close()
    out = {"calls": len(results), "killed_at": killed}
    if killed is not None:
        grace = killed + 1.0
        failed = [r for r in results if r[2] not in ("B", "C")]
        out["failed_before_kill"] = sum(1 for r in failed if r[0] < killed)
        out["failed_in_first_second"] = sum(1 for r in failed if killed <= r[0] < grace)
        out["failed_after_first_second"] = sum(1 for r in failed if r[0] >= grace)
        out["failures"] = sorted({r[2] for r in failed})
        out["started_after_first_second"] = sum(1 for r in results if r[0] >= grace)
        out["by_tag_after_first_second"] = {
            t: sum(1 for r in results if r[0] >= grace and r[2] == t) for t in ("B", "C")
        }
        around = [r for r in results if r[0] >= killed - 0.5]
        out["worst_ms_around_kill"] = round(max((r[1] for r in around), default=0) * 1000, 1)
    out["worst_ms"] = round(max((r[1] for r in results), default=0) * 1000, 1)
    out["by_tag"] = {t: sum(1 for r in results if r[2] == t) for t in ("B", "C")}
    print(json.dumps(out), flush=True)


def when_ended(servers, call, limit):
    """Asks each server (directly) when `call` ended there; waits up to `limit` seconds."""
    end = time.monotonic() + limit
    while True:
        for s in servers:
            with grpc.insecure_channel(s) as ch:
                try:
                    seen = json.loads(unary(ch, "Ended")(call.encode(), timeout=5))
                except grpc.RpcError:
                    seen = None
            if seen and (seen["ended"] is not None or time.monotonic() > end):
                return seen
        if time.monotonic() > end:
            return None
        time.sleep(0.02)


def started(servers, call, limit):
    """Waits until one server has begun `call`."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        for s in servers:
            with grpc.insecure_channel(s) as ch:
                try:
                    if json.loads(unary(ch, "Ended")(call.encode(), timeout=5)):
                        return True
                except grpc.RpcError:
                    pass
        time.sleep(0.02)
    return False


def cancel(addr, servers):
    """Cancellation and deadlines through the mesh, seen from the servers; see module notes."""
    out = {}
    channel = grpc.insecure_channel(addr, options=[("grpc.default_authority", "greeter")])
    hold = unary(channel, "Hold")
    park = channel.unary_stream(
        "/mesh.Greeter/Park", request_serializer=identity, response_deserializer=identity
    )

    def report(call, since):
        seen = when_ended(servers, call, 10)
        if not seen or seen["ended"] is None:
            return {"ended": False}
        return {
            "ended": True,
            "cancelled": seen["cancelled"],
            "lag_ms": round((seen["ended"] - since) * 1000, 1),
        }

    # A unary call cancelled while the server holds it (before any response head).
    for i in range(3):
        call = f"hold-{i}-{time.monotonic()}"
        f = hold.future(call.encode(), timeout=30)
        if not started(servers, call, 10):
            out[f"hold_{i}"] = {"error": "never reached a server"}
            continue
        t = time.monotonic()
        f.cancel()
        out[f"hold_{i}"] = report(call, t)

    # A server-streaming call cancelled after its first message (response head and data
    # sent, then the server goes quiet).
    for i in range(3):
        call = f"park-{i}-{time.monotonic()}"
        it = park(call.encode(), timeout=30)
        first = next(it).decode()
        t = time.monotonic()
        it.cancel()
        r = report(call, t)
        r["first"] = first
        out[f"park_{i}"] = r

    # A call whose deadline (1 s, sent as grpc-timeout) passes while the server holds it.
    call = f"deadline-{time.monotonic()}"
    t = time.monotonic()
    try:
        hold(call.encode(), timeout=1.0)
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    r = report(call, t + 1.0)
    r["client_code"] = code
    r["client_ms"] = round((time.monotonic() - t) * 1000, 1)
    out["deadline"] = r
    channel.close()
    print(json.dumps(out), flush=True)


def orphan(addr, servers):
    """A Hold call whose caller node is killed under it; see the module notes."""
    channel = grpc.insecure_channel(addr, options=[("grpc.default_authority", "greeter")])
    call = f"orphan-{time.monotonic()}"
    f = unary(channel, "Hold").future(call.encode(), timeout=30)
    if not started(servers, call, 10):
        print(json.dumps({"error": "never reached a server"}), flush=True)
        return
    print("STARTED", flush=True)
    sys.stdin.readline()
    t = time.monotonic()
    seen = when_ended(servers, call, 10)
    out = {"ended": bool(seen and seen["ended"] is not None)}
    if out["ended"]:
        out["cancelled"] = seen["cancelled"]
        out["lag_ms"] = round((seen["ended"] - t) * 1000, 1)
    try:
        f.result(timeout=10)
        out["client"] = "OK"
    except grpc.RpcError as e:
        out["client"] = e.code().name
    except Exception as e:  # the future's own timeout
        out["client"] = type(e).__name__
    channel.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(sys.argv[2])
    elif sys.argv[1] == "unary":
        unary_only(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "loop":
        call_loop(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "cancel":
        cancel(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "orphan":
        orphan(sys.argv[2], sys.argv[3:])
    else:
        client(sys.argv[2], int(sys.argv[3]))
