"""One vocabulary of errors: each family that a service retries on or reports is named once here."""

from __future__ import annotations

import os

import aio_pika.exceptions
import aiohttp


class APIError(RuntimeError):
    """The interface answered something other than what the protocol promises."""


#: A broker that is down, restarting or cut off, as aio-pika and aiormq raise it (a confirm or a
#: connect that takes too long is a TimeoutError).
AMQP_ERRORS: tuple[type[BaseException], ...] = (*aio_pika.exceptions.CONNECTION_EXCEPTIONS, TimeoutError)

#: An HTTP peer (the interface, nginx) that is down, slow, or answers outside the protocol.
HTTP_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, APIError, TimeoutError, OSError)


def lstat_or_none(path: str | os.PathLike[str],
                  absent: type[OSError] | tuple[type[OSError], ...] = FileNotFoundError) -> os.stat_result | None:
    """``os.lstat``, or None when nothing is there; ``absent`` says which errors mean "nothing"."""
    try:
        return os.lstat(path)
    except absent:
        return None
