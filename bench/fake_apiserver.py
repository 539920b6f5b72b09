#!/usr/bin/env python3
"""A fake Kubernetes API server for the memory benchmark (bench/memory.sh).

Serves N AgentSecrets shaped exactly as a real kube-apiserver lists them: every object is a
copy of one item of tests/fixtures/api/agentsecrets_list.json (a recorded list response, with
managedFields, the last-applied annotation and status) with its name, uid, owner, envName and
resourceVersion varied. Plain HTTP on 127.0.0.1, no authentication. It answers what
`agentsecrets run` asks for and nothing more:

- AgentSecrets: paginated LIST (`limit`/`continue`, a list resourceVersion), whole or
  metadata-only (PartialObjectMetadataList), WATCH (held open until `timeoutSeconds`, a
  BOOKMARK at the start and every 60 s when asked, no changes) and GET by name; status and
  merge PATCHes are accepted and answered with the object as patched (not stored).
- Secrets (metadata-only, PartialObjectMetadataList) and Pods: empty LISTs and idle WATCHes.
- Leases: one in-memory Lease per name (get, create, replace); with --foreign-lease, one held
  by another replica, so the operator never leads and runs no controller (its webhook cache
  alone is then measured).
- Events (events.k8s.io/v1): POST and PATCH accepted and echoed.

Objects are generated page by page from a JSON template, so the server's own memory stays
small at 100 000 objects. Usage: fake_apiserver.py --objects N --port-file FILE
"""

import argparse
import copy
import json
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

GROUP = "agentsecrets.io"
VERSION = "v1alpha1"
NAMESPACE = "sandboxes"
SECRETS_PER_OWNER = 10
LIST_RESOURCE_VERSION = "1000000"


def status(code, reason, message):
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class Objects:
    """The N AgentSecrets: object i belongs to owner i // 10 and is its (i % 10)th secret."""

    def __init__(self, fixture, count):
        with open(fixture, encoding="utf-8") as f:
            recorded = json.load(f)
        # One item of the recorded list is the template; the placeholders are replaced as text,
        # so every object serializes exactly like the recorded one, field for field.
        item = copy.deepcopy(recorded["items"][0])
        old_name = item["metadata"]["name"]
        old_owner = item["spec"]["owner"]
        old_env = item["spec"]["envName"]
        text = json.dumps(item, separators=(",", ":"))
        text = text.replace(old_name, "@NAME@")
        text = text.replace(old_env, "@ENV@")
        text = text.replace(item["metadata"]["uid"], "@UID@")
        text = text.replace(
            '"resourceVersion":"%s"' % item["metadata"]["resourceVersion"],
            '"resourceVersion":"@RV@"',
        )
        text = text.replace('"owner":"%s"' % old_owner, '"owner":"@OWNER@"')
        text = text.replace('\\"owner\\":\\"%s\\"' % old_owner, '\\"owner\\":\\"@OWNER@\\"')
        text = text.replace(" %s " % old_owner, " @OWNER@ ")
        self.template = text
        self.count = count

    @staticmethod
    def identity(i):
        owner = "user-%06d" % (i // SECRETS_PER_OWNER)
        k = i % SECRETS_PER_OWNER
        return owner, "%s-service-%d" % (owner, k), "SERVICE_%d_API_KEY" % k

    def text(self, i):
        owner, name, env = self.identity(i)
        return (
            self.template.replace("@NAME@", name)
            .replace("@ENV@", env)
            .replace("@UID@", str(uuid.UUID(int=i + 1)))
            .replace("@RV@", str(10 + i))
            .replace("@OWNER@", owner)
        )

    def index_of(self, name):
        m = re.fullmatch(r"user-(\d+)-service-(\d+)", name)
        if not m:
            return None
        i = int(m.group(1)) * SECRETS_PER_OWNER + int(m.group(2))
        return i if i < self.count else None


def merge(target, patch):
    """JSON merge patch (RFC 7386)."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = merge(target.get(key), value)
    return target


class State:
    def __init__(self, objects):
        self.objects = objects
        self.leases = {}
        self.lock = threading.Lock()
        self.counts = {}

    def count(self, what):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1


def make_handler(state):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        # --- helpers -------------------------------------------------------------------
        def send_json(self, code, body):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def read_body(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw or b"{}")
            except ValueError:
                return None

        def metadata_only(self):
            return "as=PartialObjectMetadata" in (self.headers.get("Accept") or "")

        def watch(self, query, bookmark_object):
            """Hold a watch open until timeoutSeconds; only BOOKMARKs, when asked for."""
            timeout = int(query.get("timeoutSeconds", ["290"])[0])
            bookmarks = query.get("allowWatchBookmarks", ["false"])[0] == "true"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            deadline = time.monotonic() + timeout
            try:
                while True:
                    if bookmarks:
                        line = json.dumps({"type": "BOOKMARK", "object": bookmark_object}) + "\n"
                        data = line.encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    time.sleep(min(60, left))
                    if time.monotonic() >= deadline:
                        break
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def empty_list(self, query, api_version, kind):
            if query.get("watch", ["false"])[0] in ("true", "1"):
                if self.metadata_only():
                    obj = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1"}
                else:
                    obj = {"kind": kind, "apiVersion": api_version}
                obj["metadata"] = {"resourceVersion": LIST_RESOURCE_VERSION}
                return self.watch(query, obj)
            if self.metadata_only():
                api_version, kind = "meta.k8s.io/v1", "PartialObjectMetadata"
            self.send_json(
                200,
                {
                    "kind": kind + "List",
                    "apiVersion": api_version,
                    "metadata": {"resourceVersion": LIST_RESOURCE_VERSION},
                    "items": [],
                },
            )

        # --- AgentSecrets --------------------------------------------------------------
        def agentsecrets(self, query):
            metadata_only = self.metadata_only()
            kind, api_version = "AgentSecret", "%s/%s" % (GROUP, VERSION)
            if metadata_only:
                kind, api_version = "PartialObjectMetadata", "meta.k8s.io/v1"
            which = " (metadata)" if metadata_only else ""
            if query.get("watch", ["false"])[0] in ("true", "1"):
                state.count("agentsecret watch" + which)
                obj = {
                    "kind": kind,
                    "apiVersion": api_version,
                    "metadata": {"resourceVersion": LIST_RESOURCE_VERSION},
                }
                return self.watch(query, obj)
            state.count("agentsecret list page" + which)
            objects = state.objects
            limit = int(query.get("limit", ["0"])[0] or 0) or objects.count
            start = int(query.get("continue", ["0"])[0] or 0)
            end = min(objects.count, start + limit)
            meta = {"resourceVersion": LIST_RESOURCE_VERSION}
            if end < objects.count:
                meta["continue"] = str(end)
                meta["remainingItemCount"] = objects.count - end
            head = json.dumps({"apiVersion": api_version, "kind": kind + "List", "metadata": meta})
            if metadata_only:
                # As the API server answers `as=PartialObjectMetadataList`: the whole metadata
                # (managedFields and annotations included), nothing else.
                items = (
                    json.dumps(
                        {"kind": kind, "apiVersion": api_version, "metadata": json.loads(objects.text(i))["metadata"]},
                        separators=(",", ":"),
                    )
                    for i in range(start, end)
                )
            else:
                items = (objects.text(i) for i in range(start, end))
            body = head[:-1] + ',"items":[' + ",".join(items) + "]}"
            self.send_json(200, body.encode())

        def agentsecret_get(self, name):
            state.count("agentsecret get")
            i = state.objects.index_of(name)
            if i is None:
                return self.send_json(404, status(404, "NotFound", "agentsecrets %r not found" % name))
            self.send_json(200, state.objects.text(i).encode())

        def agentsecret_patch(self, name):
            i = state.objects.index_of(name)
            if i is None:
                return self.send_json(404, status(404, "NotFound", "agentsecrets %r not found" % name))
            patch = self.read_body()
            if not isinstance(patch, dict):
                return self.send_json(400, status(400, "BadRequest", "the patch is not JSON"))
            obj = json.loads(state.objects.text(i))
            patch.pop("apiVersion", None)
            patch.pop("kind", None)
            (patch.get("metadata") or {}).pop("resourceVersion", None)
            obj = merge(obj, patch)
            self.send_json(200, obj)

        # --- Leases --------------------------------------------------------------------
        def lease(self, method, namespace, name):
            key = (namespace, name)
            with state.lock:
                if method == "GET":
                    lease = state.leases.get(key)
                    if lease is None:
                        return self.send_json(404, status(404, "NotFound", 'leases.coordination.k8s.io "%s" not found' % name))
                    return self.send_json(200, lease)
                body = self.read_body()
                if not isinstance(body, dict):
                    return self.send_json(400, status(400, "BadRequest", "the body is not JSON"))
                current = state.leases.get(key)
                if method == "POST":
                    if current is not None:
                        return self.send_json(409, status(409, "AlreadyExists", "lease exists"))
                    body.setdefault("metadata", {})["uid"] = str(uuid.uuid4())
                    code = 201
                else:
                    if current is None:
                        return self.send_json(404, status(404, "NotFound", "lease not found"))
                    sent = (body.get("metadata") or {}).get("resourceVersion")
                    if sent and sent != current["metadata"]["resourceVersion"]:
                        return self.send_json(409, status(409, "Conflict", "the object has been modified"))
                    code = 200
                rv = int(current["metadata"]["resourceVersion"]) + 1 if current else 1
                meta = body.setdefault("metadata", {})
                meta["resourceVersion"] = str(rv)
                meta.setdefault("namespace", namespace)
                body["apiVersion"] = "coordination.k8s.io/v1"
                body["kind"] = "Lease"
                state.leases[key] = body
                return self.send_json(code, body)

        # --- Events --------------------------------------------------------------------
        def event(self, method, namespace, name):
            state.count("event " + method)
            body = self.read_body()
            if not isinstance(body, dict):
                return self.send_json(400, status(400, "BadRequest", "the body is not JSON"))
            if method == "PATCH":
                base = {
                    "apiVersion": "events.k8s.io/v1",
                    "kind": "Event",
                    "metadata": {"name": name, "namespace": namespace},
                    "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
                }
                body = merge(base, body)
            body.setdefault("metadata", {}).setdefault("resourceVersion", "1")
            self.send_json(201 if method == "POST" else 200, body)

        # --- routing -------------------------------------------------------------------
        def route(self, method):
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            parts = [p for p in url.path.split("/") if p]
            try:
                return self.dispatch(method, parts, query)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def dispatch(self, method, parts, query):
            # /apis/agentsecrets.io/v1alpha1[/namespaces/NS]/agentsecrets[/NAME[/status]]
            if parts[:3] == ["apis", GROUP, VERSION]:
                rest = parts[3:]
                if rest[:1] == ["namespaces"] and len(rest) >= 3:
                    rest = rest[2:]
                if rest == ["agentsecrets"] and method == "GET":
                    return self.agentsecrets(query)
                if len(rest) == 2 and rest[0] == "agentsecrets" and method == "GET":
                    return self.agentsecret_get(rest[1])
                if len(rest) in (2, 3) and rest[0] == "agentsecrets" and method == "PATCH":
                    state.count("agentsecret patch" + (" status" if len(rest) == 3 else ""))
                    return self.agentsecret_patch(rest[1])
            if parts[:3] == ["apis", "coordination.k8s.io", "v1"] and len(parts) >= 6 and parts[5] == "leases":
                if len(parts) == 6 and method == "POST":
                    return self.lease_create(parts[4])
                if len(parts) == 7:
                    return self.lease(method, parts[4], parts[6])
            if parts[:3] == ["apis", "events.k8s.io", "v1"] and len(parts) >= 6 and parts[5] == "events":
                return self.event(method, parts[4], parts[6] if len(parts) > 6 else "")
            if method == "GET" and parts[:2] == ["api", "v1"]:
                rest = parts[2:]
                if rest[:1] == ["namespaces"] and len(rest) >= 3:
                    rest = rest[2:]
                if rest == ["secrets"]:
                    return self.empty_list(query, "v1", "Secret")
                if rest == ["pods"]:
                    return self.empty_list(query, "v1", "Pod")
            state.count("unhandled %s /%s" % (method, "/".join(parts)))
            self.read_body()
            self.send_json(404, status(404, "NotFound", "not served by the fake API server"))

        def lease_create(self, namespace):
            # Peek at the body for the name, then hand it back to the common path.
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b"{}"
            try:
                body = json.loads(raw)
            except ValueError:
                return self.send_json(400, status(400, "BadRequest", "the body is not JSON"))
            name = (body.get("metadata") or {}).get("name", "")
            self.read_body = lambda: body
            return self.lease("POST", namespace, name)

        def do_GET(self):
            self.route("GET")

        def do_POST(self):
            self.route("POST")

        def do_PUT(self):
            self.route("PUT")

        def do_PATCH(self):
            self.route("PATCH")

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, required=True)
    parser.add_argument("--fixture", default="tests/fixtures/api/agentsecrets_list.json")
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--stats-file", help="request counts are written here every 2 s")
    parser.add_argument(
        "--foreign-lease",
        metavar="NAMESPACE/NAME",
        help="a Lease held by another replica for an hour, so the operator never leads",
    )
    args = parser.parse_args()
    state = State(Objects(args.fixture, args.objects))
    if args.foreign_lease:
        namespace, name = args.foreign_lease.split("/", 1)
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        state.leases[(namespace, name)] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
            "spec": {
                "holderIdentity": "another-replica",
                "leaseDurationSeconds": 3600,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    with open(args.port_file, "w", encoding="utf-8") as f:
        f.write(str(server.server_address[1]))
    if args.stats_file:

        def stats():
            while True:
                time.sleep(2)
                with state.lock:
                    text = json.dumps(state.counts, sort_keys=True)
                with open(args.stats_file, "w", encoding="utf-8") as f:
                    f.write(text)

        threading.Thread(target=stats, daemon=True).start()
    print("fake API server on 127.0.0.1:%d with %d AgentSecrets" % (server.server_address[1], args.objects), file=sys.stderr)
    server.serve_forever()


if __name__ == "__main__":
    main()
