"""A real OTLP/HTTP trace receiver for node/tests/tracing.rs.

POST /v1/traces takes an `ExportTraceServiceRequest` (protobuf, decoded with the
`opentelemetry-proto` package) and keeps every span, flattened with its resource's attributes;
GET /spans answers them as JSON. Mode `fail` answers every export with 500 (a broken
collector). Prints `READY <port>` once listening on 127.0.0.1; runs until stdin closes.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

MODE = sys.argv[1] if len(sys.argv) > 1 else "ok"
SPANS = []
EXPORTS = {"ok": 0, "failed": 0}
LOCK = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attrs(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, code, body, ctype):
        self.send_response(code)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path != "/v1/traces":
            return self.answer(404, b"", "text/plain")
        if MODE == "fail":
            with LOCK:
                EXPORTS["failed"] += 1
            return self.answer(500, b"collector failing on purpose", "text/plain")
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        spans = []
        for rs in req.resource_spans:
            resource = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        {
                            "resource": resource,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "name": s.name,
                            "kind": s.kind,
                            "attributes": attrs(s.attributes),
                            "events": [
                                {"name": e.name, "attributes": attrs(e.attributes)}
                                for e in s.events
                            ],
                            "status_code": s.status.code,
                            "status_message": s.status.message,
                            "content_type": self.headers.get("content-type"),
                            "x_tenant": self.headers.get("x-tenant"),
                        }
                    )
        with LOCK:
            SPANS.extend(spans)
            EXPORTS["ok"] += 1
        out = ExportTraceServiceResponse().SerializeToString()
        self.answer(200, out, "application/x-protobuf")

    def do_GET(self):
        with LOCK:
            doc = {"spans": SPANS, "exports": EXPORTS}
            body = json.dumps(doc).encode()
        self.answer(200, body, "application/json")


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"READY {server.server_address[1]}", flush=True)
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
