"""A stand-in platform that says exactly what a test scripts: hostile text, odd tokens, echoes.

Not the simulator: no rate limit, no faults, no timing, one account. It serves the
platform's three endpoints over a real socket, and every answer a test does not
script is the ordinary one, so a test can put any string where the platform's
words go (campaign ids, error messages, the access token) and watch where it ends up.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# An answer: HTTP status and JSON body; None means the ordinary answer.
Answer = tuple[int, dict[str, Any]] | None


def campaign(cid: str, **over: Any) -> dict[str, Any]:
    """A valid campaign payload with id ``cid``; ``over`` replaces (or, as None, drops) fields."""
    payload: dict[str, Any] = {
        "id": cid,
        "name": f"Campaign {cid}",
        "status": "active",
        "budget": 1000,
        "impressions": 10,
        "clicks": 2,
        "conversions": 1,
        "created_at": "2024-12-11T10:30:00.000Z",
    }
    for key, value in over.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


def _new_token() -> str:
    return f"tok-{secrets.token_hex(12)}"


@dataclass
class Script:
    """What the stand-in answers; the fields may be changed between runs."""

    campaigns: list[dict[str, Any]]
    # Called for every token request: the access token to hand out.
    token: Callable[[], str] = _new_token
    # (page number, bearer token of the request) -> answer for a list request.
    list_answer: Callable[[int, str], Answer] = lambda _page, _token: None
    # (campaign id, bearer token of the request) -> answer for a sync call.
    sync_answer: Callable[[str, str], Answer] = lambda _cid, _token: None


@dataclass
class StandIn:
    """A running stand-in: where it listens and every token it handed out."""

    url: str
    script: Script
    issued: list[str] = field(default_factory=list)


def _handler(standin: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _token(self) -> str | None:
            scheme, _, token = self.headers.get("Authorization", "").partition(" ")
            return token if scheme == "Bearer" and token in standin.issued else None

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            token = self._token()
            if url.path != "/api/campaigns":
                self._send(404, {"error": "Not found", "message": url.path})
            elif token is None:
                self._send(401, {"error": "Unauthorized", "message": "bad token"})
            else:
                query = parse_qs(url.query)
                page = int(query.get("page", ["1"])[0])
                limit = int(query.get("limit", ["10"])[0])
                answer = standin.script.list_answer(page, token)
                if answer is not None:
                    self._send(*answer)
                    return
                everything = standin.script.campaigns
                data = everything[(page - 1) * limit : page * limit]
                pagination = {
                    "page": page,
                    "limit": limit,
                    "total": len(everything),
                    "has_more": page * limit < len(everything),
                }
                self._send(200, {"data": data, "pagination": pagination})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = urlsplit(self.path).path
            if path == "/auth/token":
                token = standin.script.token()
                standin.issued.append(token)
                self._send(
                    200,
                    {"access_token": token, "token_type": "Bearer", "expires_in": 3600},
                )
                return
            parts = path.split("/")
            token = self._token()
            if len(parts) != 5 or parts[:3] != ["", "api", "campaigns"] or parts[4] != "sync":
                self._send(404, {"error": "Not found", "message": path})
            elif token is None:
                self._send(401, {"error": "Unauthorized", "message": "bad token"})
            else:
                cid = unquote(parts[3])
                answer = standin.script.sync_answer(cid, token)
                if answer is not None:
                    self._send(*answer)
                    return
                self._send(
                    200,
                    {
                        "success": True,
                        "campaign_id": cid,
                        "synced_at": "2025-01-01T00:00:00Z",
                        "message": "synced",
                    },
                )

    return Handler


@contextmanager
def standin_platform(script: Script) -> Iterator[StandIn]:
    """Serve ``script`` on a free loopback port until the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    standin = StandIn(url=f"http://127.0.0.1:{server.server_address[1]}", script=script)
    server.RequestHandlerClass = _handler(standin)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="standin", daemon=True)
    thread.start()
    try:
        yield standin
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
