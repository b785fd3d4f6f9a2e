"""What every request of ``graft serve`` passes before a route sees it.

Two ASGI middlewares, outermost first:

- ``Guard``: the request's ``Host`` must be one of the server's own names (a DNS-rebinding page
  names its own domain), a ``POST`` from a browser must come from the server's own origin, the
  review API's token is checked from its header before any body is read, every response carries
  the security headers below, and one access-log line is written per request (the token never
  appears in it).
- ``BodyLimit``: a request body over ``max_bytes`` is answered 413 before it is read whole
  (declared length or counted while streaming); a body that stops arriving is answered 408.

Connections that never finish their headers are the business of ``graftkit.serve.protocol``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import time
from collections.abc import Callable, Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit

TOKEN_HEADER = "X-Graft-Token"
TOKEN_PATHS = ("/review/api/",)
SECURITY_HEADERS = [
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    # Every script, style and image is the server's own (thumbnails and previews are blob: URLs);
    # nothing may frame the pages or send a form elsewhere. WebAssembly may be compiled (not
    # eval): ONNX Runtime Web runs the exported model on the /browser/ page.
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
     b"script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; connect-src 'self'; object-src 'none'; "
     b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
]
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")


async def respond(send, status: int, detail: str, close: bool = False) -> None:
    """A JSON ``{"detail": ...}`` answer sent straight from a middleware."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def split_host(value: str) -> tuple[str, int | None]:
    """``Host`` / ``Origin`` netloc -> (lower-case name without brackets, port or None)."""
    try:
        parts = urlsplit("//" + value)
        name, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", None
    return name, port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def redacted(path: str, query: bytes) -> str:
    """The request target for the log, with any ``token`` parameter's value hidden."""
    if not query:
        return path
    pairs = [(k, "***" if k == "token" else v)
             for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True)]
    return f"{path}?{urlencode(pairs)}"


class Guard:
    """Host, origin and token checks, security headers and the access log.

    Args:
        app: the ASGI app to guard.
        token: the review API's token.
        port: the port the server listens on (None: not known yet, any port).
        hosts: the names a request may call the server by, besides 127.0.0.1, localhost and
            ::1 (the ``--host`` given and ``--allow-host`` names). An IP address as the host is
            accepted on any interface: a rebinding page cannot name one. Defaults to none.
        log: where access-log lines go; None for none. Defaults to None.
    """

    def __init__(self, app, token: str, port: int | None, hosts: Iterable[str] = (),
                 log: Callable[[str], None] | None = None):
        self.app, self.token, self.port, self.log = app, token.encode(), port, log
        self.names = {split_host(h)[0] or h.lower().strip("[]") for h in (*LOCAL_NAMES, *hosts)}

    def host_problem(self, host: str | None) -> str | None:
        if host is None:  # HTTP/1.0 without Host: not a browser, nothing to rebind
            return None
        name, port = split_host(host)
        if name and (name in self.names or _is_ip(name)) and \
                (port is None or self.port is None or port == self.port):
            return None
        return (f"this server does not answer to the host name {host!r}: open it as "
                f"http://127.0.0.1:{self.port or 'PORT'}/ or start graft serve with --allow-host NAME")

    def origin_problem(self, origin: str | None, host: str | None) -> str | None:
        if origin is None:  # not a browser (curl, scripts): the Host check above applies
            return None
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and host is not None \
                and parts.netloc.lower() == host.lower():
            return None
        return f"refused: a page from {origin} may not send requests to this server"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

        async def secured(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  *SECURITY_HEADERS]}
            await send(message)

        try:
            problem, code = self.host_problem(headers.get("host")), 400
            if problem is None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
                problem, code = self.origin_problem(headers.get("origin"), headers.get("host")), 403
            if problem is None and scope["path"].startswith(TOKEN_PATHS):
                given = headers.get(TOKEN_HEADER.lower(), "").encode("latin-1")
                if not secrets.compare_digest(given, self.token):
                    problem, code = (f"missing or wrong token: open the review URL graft serve "
                                     f"printed (the page sends it as the {TOKEN_HEADER} header)"), 403
            if problem is not None:
                status = code
                await respond(send, code, problem)
            else:
                await self.app(scope, receive, secured)
        finally:
            if self.log is not None:
                client = (scope.get("client") or ("-",))[0]
                target = redacted(scope["path"], scope.get("query_string", b""))
                ms = (time.perf_counter() - start) * 1000
                self.log(f'{client} "{scope["method"]} {target}" {status} {ms:.0f} ms')


class BodyLimit:
    """Bounds a request body in size and in time.

    Args:
        app: the ASGI app.
        max_bytes: the largest body accepted; larger ones are answered 413.
        idle_timeout: seconds a body may go without sending anything: then 408.
        total_timeout: seconds a whole body may take: then 408.
    """

    def __init__(self, app, max_bytes: int, idle_timeout: float = 15.0,
                 total_timeout: float = 120.0):
        self.app, self.max_bytes = app, max_bytes
        self.idle_timeout, self.total_timeout = idle_timeout, total_timeout

    def _too_large(self) -> str:
        mb = self.max_bytes / 2**20
        return (f"upload larger than {mb:g} MB: send smaller images or start graft serve with a "
                "larger --max-upload-mb")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            return await respond(send, 413, self._too_large(), close=True)
        received, started, refused, whole = 0, False, False, False
        deadline = time.monotonic() + self.total_timeout

        async def refuse(status: int, detail: str) -> dict:
            nonlocal refused
            refused = True
            if not started:
                await respond(send, status, detail, close=True)
            return {"type": "http.disconnect"}  # the app stops reading the body

        async def bounded():
            nonlocal received, whole
            if refused:
                return {"type": "http.disconnect"}
            if whole:  # the body is in: the app now waits for a disconnect, however long
                return await receive()
            wait = min(self.idle_timeout, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.001))
            except asyncio.TimeoutError:
                return await refuse(408, "the request body stopped arriving: send it again "
                                         "whole, without pauses")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                whole = not message.get("more_body", False)
                if received > self.max_bytes:
                    return await refuse(413, self._too_large())
            return message

        async def watched(message):
            nonlocal started
            if refused:  # the 4xx went out: whatever the app answers to the cut body is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded, watched)
        except Exception:
            if not refused:
                raise
