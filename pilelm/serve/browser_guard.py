"""What a web page in the user's browser may ask of ``pilelm serve``: nothing it was not let to.

A server on 127.0.0.1 is reachable from every page the user opens. Two attacks need no key
when none is set (and the first needs none even with one, if the browser holds none):

- **Cross-site requests.** A page can POST a form (``text/plain`` or
  ``application/x-www-form-urlencoded``) to ``http://127.0.0.1:8000/v1/completions`` without
  a CORS preflight and spend the machine's compute. Every POST must be
  ``application/json``, which a page can only send after a preflight this server does not
  grant (unless ``--allow-origin`` lists the page's origin); and a request whose ``Origin``
  header names a site other than this server is refused.
- **DNS rebinding.** A page at ``evil.example`` re-points its name at 127.0.0.1 and talks to
  the server as its own origin. The ``Host`` header then says ``evil.example``: only the
  names the server is bound to (for a loopback bind: ``localhost``, ``127.x.x.x``, ``::1``)
  and the hosts of ``--allow-origin`` are accepted.

A wildcard bind (``0.0.0.0``, ``::``) answers to any name, so ``Host`` is not checked there
(such a server needs an API key, see ``pilelm.serve.server``); ``--allow-origin '*'`` turns
both checks off. See https://developer.mozilla.org/en-US/docs/Web/HTTP/CORS#simple_requests
and https://en.wikipedia.org/wiki/DNS_rebinding.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pilelm.serve.schemas import APIError

LOOPBACK_NAMES = frozenset({"localhost"})
JSON_MEDIA_TYPE = "application/json"


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _hostname(netloc: str) -> str:
    """``127.0.0.1:8000`` -> ``127.0.0.1``; ``[::1]:8000`` -> ``::1``."""
    return (urlsplit(f"//{netloc}").hostname or "").lower()


class BrowserGuard:
    """Checks ``Host``, ``Origin`` and ``Content-Type`` for a server bound to ``bind_host``."""

    def __init__(self, bind_host: str, allow_origin: list[str] | tuple[str, ...] = ()):
        self.open = "*" in allow_origin
        self.origins = {o.rstrip("/").lower() for o in allow_origin if o != "*"}
        self.bind = bind_host.strip("[]").lower()
        self.extra_hosts = {urlsplit(o).hostname or "" for o in self.origins}

    def host_allowed(self, host: str) -> bool:
        if self.open or is_wildcard(self.bind):
            return True
        if host in self.extra_hosts or host == self.bind:
            return True
        return is_loopback(self.bind) and is_loopback(host)

    def problem(self, headers: dict[str, str] | object) -> str | None:
        """Why a request with these headers is refused, or None."""
        get = headers.get  # type: ignore[attr-defined]
        host_header = get("host", "").lower()
        host = _hostname(host_header)
        if not self.host_allowed(host):
            return (f"Host {host!r} is not a name this server is bound to ({self.bind}); "
                    "start it with --allow-origin to accept it")
        origin = get("origin")
        if origin and not self.open and origin.rstrip("/").lower() not in self.origins:
            same_origin = urlsplit(origin).netloc.lower() == host_header  # the playground's own page
            if not same_origin:
                return (f"requests from the web page at {origin} are not allowed; start the server with "
                        f"--allow-origin {origin} to let that page use it")
        return None


def is_json(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == JSON_MEDIA_TYPE


class BrowserGuardMiddleware:
    """ASGI middleware answering 403 to requests ``BrowserGuard`` refuses and 415 to POSTs that
    are not JSON (a plain ASGI wrapper: it leaves ``receive`` untouched, so
    disconnects reach the endpoints)."""

    def __init__(self, app: ASGIApp, guard: BrowserGuard):
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            problem = self.guard.problem(headers)
            error = APIError(403, problem, code="forbidden_origin") if problem is not None else None
            if error is None and scope["method"] == "POST" and not is_json(headers.get("content-type")):
                error = APIError(415, "send the request body as JSON with the header "
                                      "'Content-Type: application/json'", code="unsupported_media_type")
            if error is not None:
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)
