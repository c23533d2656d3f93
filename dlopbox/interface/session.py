"""Browser sessions for the dashboard: the read token is posted once, a random session id rides a cookie.

EventSource cannot send an Authorization header, and a token in a URL ends up in logs and
history; so the sign-in form posts the read token and gets back an HttpOnly, SameSite=Strict
cookie holding a random id. The id is only a key into this process's memory: a restart signs
every browser out. The write token is refused here, so it never reaches a browser.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict

from aiohttp import web

COOKIE = "dlopbox_session"
#: A session unused for this long is forgotten.
IDLE_SECONDS = 12 * 3600
#: Sessions kept at once; signing in past it forgets the least recently used.
MAX_SESSIONS = 1000


class SignInRefused(Exception):
    """The token presented at sign-in cannot open a session (the message says why)."""


class Sessions:
    """Session ids by last use; the only state a signed-in browser has on the server."""

    def __init__(self, read_token: str, write_token: str, idle: float = IDLE_SECONDS,
                 limit: int = MAX_SESSIONS) -> None:
        self._read_token = read_token
        self._write_token = write_token
        self.idle = idle
        self.limit = limit
        self._used: OrderedDict[str, float] = OrderedDict()

    def sign_in(self, token: str) -> str:
        """A new session id for the read token; :class:`SignInRefused` for anything else."""
        given = token.strip().encode()
        if not given:
            raise SignInRefused("enter the read token (DLOPBOX_READ_TOKEN)")
        if self._write_token and hmac.compare_digest(given, self._write_token.encode()):
            raise SignInRefused("that is the write token, which never goes into a browser: "
                                "sign in with the read token (DLOPBOX_READ_TOKEN)")
        if not (self._read_token and hmac.compare_digest(given, self._read_token.encode())):
            raise SignInRefused("wrong token: sign in with the read token (DLOPBOX_READ_TOKEN)")
        session_id = secrets.token_urlsafe(32)
        self._used[session_id] = time.monotonic()
        while len(self._used) > self.limit:
            self._used.popitem(last=False)
        return session_id

    def valid(self, request: web.Request) -> bool:
        """Whether the request carries a live session cookie (and mark it used)."""
        session_id = request.cookies.get(COOKIE)
        if not session_id:
            return False
        now = time.monotonic()
        used = self._used.get(session_id)
        if used is None:
            return False
        if now - used > self.idle:
            del self._used[session_id]
            return False
        self._used[session_id] = now
        self._used.move_to_end(session_id)
        return True

    def sign_out(self, request: web.Request) -> None:
        session_id = request.cookies.get(COOKIE)
        if session_id:
            self._used.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._used)


def set_cookie(response: web.StreamResponse, session_id: str) -> None:
    response.set_cookie(COOKIE, session_id, httponly=True, samesite="Strict", path="/", max_age=IDLE_SECONDS)


def clear_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/")
