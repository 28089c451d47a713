"""The labeling page's server: a small WSGI app on werkzeug, listening on 127.0.0.1 by default.

    GET  /               the page (static HTML; the script and style are separate files, so a
                         Content-Security-Policy without inline scripts applies)
    GET  /api/state      progress, the next item in its shown order, the summary when done
    POST /api/label      a decision on the current item (JSON), appended to the label file
    GET  /api/summary    the figures of the label file (feedback/labels.py: summary)

Nothing is rendered into HTML on the server. The page puts every text it shows into the DOM with
textContent, so a response holding markup or a script shows as text. The API answers only JSON
POSTs (which a page on another site cannot send without a CORS preflight, which is not allowed)
and only requests whose Host is the address it listens on (no DNS rebinding).

Which response is shown on which side is decided by a hash of the seed, the rater and the item,
so a reload shows the same item the same way; the record keeps that order (`shown`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

from werkzeug.exceptions import BadRequest, Forbidden, HTTPException, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from tether.feedback.items import Item
from tether.feedback.labels import STRENGTHS, LabelFile, make_record, summary

log = logging.getLogger("tether")

STATIC = {"label.js": "text/javascript", "label.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def shown_order(seed: int, rater: str, item: Item) -> list[int]:
    """The response indices left to right for this rater and item, the same on every request."""
    digest = hashlib.sha256(f"{seed}\0{rater}\0{item.key}".encode()).digest()
    order = list(range(item.k))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


class LabelApp:
    """The page's state: the items, the label file, the rater, which items they have done."""

    def __init__(self, items: Sequence[Item], output: str | Path, rater: str, seed: int = 0,
                 allowed_hosts: Sequence[str] = ()):
        self.items = list(items)
        self.by_key = {it.key: it for it in self.items}
        self.labels = LabelFile(output)
        self.rater, self.seed = rater, seed
        self.allowed_hosts = set(allowed_hosts)
        self.lock = threading.Lock()
        records = self.labels.read()
        self.done = {r["item"] for r in records if r.get("rater") == rater and r["item"] in self.by_key}
        self.urls = Map([Rule("/", endpoint="page"), Rule("/static/<name>", endpoint="static"),
                         Rule("/favicon.ico", endpoint="favicon"),
                         Rule("/api/state", endpoint="state", methods=["GET"]),
                         Rule("/api/label", endpoint="label", methods=["POST"]),
                         Rule("/api/summary", endpoint="summary", methods=["GET"])])

    # ------------------------------------------------------------------ state

    def next_item(self) -> Optional[Item]:
        return next((it for it in self.items if it.key not in self.done), None)

    def state(self) -> dict:
        item = self.next_item()
        out = {"rater": self.rater, "done": len(self.done), "total": len(self.items)}
        if item is None:
            out["summary"] = summary(self.items, self.labels.read())
            return out
        order = shown_order(self.seed, self.rater, item)
        out["item"] = {"key": item.key, "prompt": item.prompt,
                       "responses": [item.responses[i] for i in order], "k": item.k}
        return out

    def record(self, body: dict) -> dict:
        """Validate a decision on the item the page showed, append it, return the next state."""
        key = body.get("key")
        item = self.by_key.get(key) if isinstance(key, str) else None
        if item is None:
            raise BadRequest("unknown item")
        decision = body.get("decision")
        strength = body.get("strength") or ""
        note = body.get("note") or ""
        if strength not in STRENGTHS or not isinstance(note, str) or len(note) > 10_000:
            raise BadRequest("bad strength or note")
        order = shown_order(self.seed, self.rater, item)
        if decision == "chose" and item.k == 2:
            side = body.get("choice")
            if side not in (0, 1):
                raise BadRequest("choice must be 0 (left) or 1 (right)")
            ranks = [1, 1]
            ranks[order[side]] = 0
        elif decision == "ranked":
            ranking = body.get("ranking")  # shown positions, best first
            if not isinstance(ranking, list) or sorted(ranking) != list(range(item.k)):
                raise BadRequest(f"ranking must order all {item.k} shown positions")
            ranks = [0] * item.k
            for place, position in enumerate(ranking):
                ranks[order[position]] = place
        elif decision in ("tie", "skip"):
            ranks = [0] * item.k
        else:
            raise BadRequest("decision must be chose, ranked, tie or skip")
        record = make_record(item, ranks, self.rater, decision, shown=order,
                             strength=strength if decision in ("chose", "ranked") else "", note=note)
        with self.lock:
            self.labels.append([record])
            self.done.add(item.key)
        return self.state()

    # ------------------------------------------------------------------ WSGI

    def __call__(self, environ, start_response):
        request = Request(environ)
        try:
            response = self.dispatch(request)
        except HTTPException as err:
            response = Response(json.dumps({"error": err.description}), status=err.code,
                                mimetype="application/json")
        response.headers.extend(HEADERS)
        return response(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        if self.allowed_hosts and request.host not in self.allowed_hosts:
            raise Forbidden("unexpected Host header")
        endpoint, args = self.urls.bind_to_environ(request.environ).match()
        if endpoint == "favicon":
            return Response(status=204)
        if endpoint == "page":
            return Response(_asset("label.html"), mimetype="text/html")
        if endpoint == "static":
            if args["name"] not in STATIC:
                raise NotFound()
            return Response(_asset(args["name"]), mimetype=STATIC[args["name"]])
        if endpoint == "label":
            if request.mimetype != "application/json":
                raise BadRequest("send JSON")
            body = request.get_json(silent=True)
            if not isinstance(body, dict):
                raise BadRequest("send a JSON object")
            return _json(self.record(body))
        if endpoint == "summary":
            return _json(summary(self.items, self.labels.read()))
        return _json(self.state())


def _asset(name: str) -> bytes:
    return resources.files("tether.feedback").joinpath("static", name).read_bytes()


def _json(obj: dict) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), mimetype="application/json")


def serve(app: LabelApp, host: str = "127.0.0.1", port: int = 0):
    """A threaded server for `app`, not yet started: call `.serve_forever()` (and `.shutdown()`).
    Its address is `server.server_address`. On a loopback address the app answers only requests
    for that Host (no DNS rebinding); on any other it was exposed on purpose and says so."""
    server = make_server(host, port, app, threaded=True)
    bound = server.server_address[1]
    if host in ("127.0.0.1", "localhost", "::1"):  # a page for this machine only
        app.allowed_hosts = {f"{n}:{bound}" for n in ("localhost", "127.0.0.1", "[::1]")} | set(app.allowed_hosts)
    else:  # exposed on purpose (--host): raters reach it under names we cannot know
        log.warning("tether label listens on %s: anyone who can reach this machine can read the "
                    "items and add labels", host)
    return server
