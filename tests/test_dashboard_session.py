"""Dashboard sessions (dlopbox/interface/session.py): which tokens sign in, expiry, the bound on sessions."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from dlopbox.interface.session import COOKIE, Sessions, SignInRefused


def request_with(session_id: str | None):
    headers = {"Cookie": f"{COOKIE}={session_id}"} if session_id else {}
    return make_mocked_request("GET", "/live", headers=headers)


def test_only_the_read_token_signs_in_and_each_refusal_says_why():
    sessions = Sessions("read-token", "write-token")
    for token, reason in (("", "enter the read token"), ("nope", "wrong token"), ("write-token", "write token")):
        with pytest.raises(SignInRefused, match=reason):
            sessions.sign_in(token)
    session_id = sessions.sign_in("read-token")
    assert len(session_id) >= 40 and "read-token" not in session_id
    assert sessions.valid(request_with(session_id))
    assert not sessions.valid(request_with("forged"))
    assert not sessions.valid(request_with(None))
    sessions.sign_out(request_with(session_id))
    assert not sessions.valid(request_with(session_id))


def test_sessions_expire_when_idle_and_are_bounded():
    sessions = Sessions("r", "w", idle=-1.0, limit=2)  # already idle for too long
    expired = sessions.sign_in("r")
    assert not sessions.valid(request_with(expired))
    sessions = Sessions("r", "w", limit=2)
    first, second, third = (sessions.sign_in("r") for _ in range(3))
    assert len(sessions) == 2
    assert not sessions.valid(request_with(first))
    assert sessions.valid(request_with(second)) and sessions.valid(request_with(third))
