"""MongoDB: the append-only event log, the current state of the tree, batches, clients, meta.

One numbered batch is written in one transaction: its batch record (keyed by its first
seq, so a second write of the same batch is a duplicate key and nothing else), its event
rows, the state rows it changes and the head. Writing a batch twice is therefore harmless,
which is what lets the interface write directly and from its journal without coordination.

Collections:
  events   one row per event: seq (unique), op, path, dest, is_dir, size, mtime_ns, mode,
           digest, ts, batch_id, logged_at
  state    one document per path (_id and path = the path): is_dir, size, mtime_ns, mode,
           digest, seq (the seq that last touched it); queried and sorted by _id, whose
           index every write maintains anyway
  batches  _id = first_seq, batch_id, last_seq, logged_at
  clients  _id = client id, seq, last_seen, local_differences (when the client reported it)
  meta     {_id: "head", seq}: the last logged seq; {_id: "journal", seq}: the last seq
           seen in the RabbitMQ journal, i.e. known to be published; {_id: "writer", lsid}:
           the session the interface's transactions run in (see :meth:`EventLog._writer`);
           {_id: "master", report, received_at}: the watcher's last report (PUT /master)

Every transaction runs in one session per interface process. A transaction its writer could not
end (a timeout, a lost connection, the process killed) stays open on the server, holding its
documents for transactionLifetimeLimitSeconds (60 s by default) and failing every later write of
them with WriteConflict; knowing the session lets the interface end it at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from types import EllipsisType
from typing import Any

import pymongo
from pymongo import AsyncMongoClient, DeleteOne, ReplaceOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import (
    BulkWriteError,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from ..events import Batch, Entry, Event, Op
from ..paths import ancestors
from ..tree import Tree

log = logging.getLogger(__name__)

_EVENT_FIELDS = ("op", "path", "dest", "is_dir", "size", "mtime_ns", "mode", "digest", "seq", "ts", "blocks")
_ENTRY_FIELDS = ("size", "mtime_ns", "mode", "digest", "seq", "blocks")
#: Exact paths fetched per query: SecantusDB slows down sharply on very long $in lists.
_IN_CHUNK = 100
#: Indexes of earlier versions that nothing queries: each insert paid for them (half the cost
#: of logging a 1,000-event batch on SecantusDB), so they are dropped.
_UNUSED_INDEXES = {"events": "ts_1", "state": "path_1"}


class Unconfirmed(Exception):
    """The batch was not confirmed elsewhere, so its transaction was aborted: nothing was written."""


def subtree(path: str) -> dict[str, str]:
    """A range matching every path strictly below ``path`` ("/" + 1 is "0" in byte order)."""
    return {"$gte": path + "/", "$lt": path + "0"}


def event_doc(event: Event, batch_id: str, now: datetime) -> dict[str, Any]:
    return {**event.to_dict(), "is_dir": event.is_dir, "batch_id": batch_id, "logged_at": now}


def event_from_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """A log row as the protocol's event dict (null fields and bookkeeping left out)."""
    out = {k: doc[k] for k in _EVENT_FIELDS if doc.get(k) is not None}
    if not out.get("is_dir"):
        out.pop("is_dir", None)
    return out


def state_doc(entry: Entry) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": entry.path, "path": entry.path, "is_dir": entry.is_dir}
    for name in _ENTRY_FIELDS:
        value = getattr(entry, name)
        if value is not None:
            doc[name] = value.to_dict() if name == "blocks" else value
    return doc


def entry_from_doc(doc: dict[str, Any]) -> Entry:
    return Entry(doc["path"], bool(doc.get("is_dir")), **{k: doc.get(k) for k in _ENTRY_FIELDS})


class EventLog:
    """The interface's MongoDB database. Creating one does no I/O; every method may raise PyMongoError."""

    def __init__(self, url: str, database: str, timeout: float) -> None:
        self.timeout = timeout
        self.client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url, serverSelectionTimeoutMS=int(timeout * 1000), connectTimeoutMS=int(timeout * 1000))
        db = self.client[database]
        self.events = db["events"]
        self.state = db["state"]
        self.batches = db["batches"]
        self.clients = db["clients"]
        self.meta = db["meta"]
        self._session: AsyncClientSession | None = None

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                await session.end_session()
            except PyMongoError as exc:
                log.debug("ending the writer session: %s", exc)
        await self.client.close()

    async def _writer(self) -> AsyncClientSession:
        """The session every transaction runs in; the one recorded before it is ended first.

        That one belonged to an earlier writer (or to this one, before a failure): if it was
        killed mid-write, its transaction is still open and holds the documents it wrote.
        """
        if self._session is None:
            previous = await self.meta.find_one({"_id": "writer"})
            if previous is not None and previous.get("lsid") is not None:
                await self.client.admin.command("killSessions", [{"id": previous["lsid"]}])
            session = self.client.start_session()
            try:
                await self.meta.update_one({"_id": "writer"}, {"$set": {"lsid": session.session_id["id"]}},
                                           upsert=True)
            except BaseException:
                await session.end_session()
                raise
            self._session = session
        return self._session

    async def _abandon(self, session: AsyncClientSession) -> None:
        """End a session whose transaction may still be open on the server; the next write opens another.

        Run outside the caller's deadline (a fresh context), which has usually expired by now.
        """
        if self._session is session:
            self._session = None

        async def kill() -> None:
            with pymongo.timeout(self.timeout):
                await self.client.admin.command("killSessions", [session.session_id])
            await session.end_session()

        try:
            await asyncio.shield(asyncio.create_task(kill(), context=contextvars.Context()))
        except PyMongoError as exc:
            log.info("could not end an interrupted transaction's session (the server ends it later): %s", exc)

    async def ping(self) -> None:
        with pymongo.timeout(self.timeout):
            await self.client.admin.command("ping")

    async def ensure_indexes(self) -> None:
        await self.events.create_index("seq", unique=True)
        await self.events.create_index([("path", 1), ("seq", 1)])
        await self.events.create_index([("dest", 1), ("seq", 1)])
        await self.batches.create_index("batch_id")
        for collection, name in _UNUSED_INDEXES.items():
            try:
                await self.events.database[collection].drop_index(name)
            except OperationFailure:
                pass  # not there: a new database, or dropped by an earlier start

    # -- writing ---------------------------------------------------------------------------

    async def write(self, batch: Batch, confirm: Callable[[], Awaitable[bool]] | None = None) -> bool:
        """Log a numbered batch and apply it to the state atomically; False if already logged.

        With ``confirm``, the transaction commits only if ``confirm()`` (awaited once every
        write is staged) returns True; otherwise it aborts and :class:`Unconfirmed` is raised.
        """
        assert batch.first_seq is not None and batch.last_seq is not None
        now = datetime.now(UTC)
        session = await self._writer()
        try:
            try:
                async with await session.start_transaction():
                    # First, so that a batch already logged costs one failed insert and nothing else.
                    await self.batches.insert_one({"_id": batch.first_seq, "batch_id": batch.batch_id,
                                                   "last_seq": batch.last_seq, "logged_at": now}, session=session)
                    await self.events.insert_many([event_doc(e, batch.batch_id, now) for e in batch.events],
                                                  session=session)
                    changes = await self._state_changes(batch.events, session)
                    if changes:
                        await self.state.bulk_write(changes, session=session)
                    await self.meta.update_one({"_id": "head"}, {"$max": {"seq": batch.last_seq}}, upsert=True,
                                               session=session)
                    if confirm is not None and not await confirm():
                        raise Unconfirmed(batch.batch_id)
            except DuplicateKeyError:
                return False
            except BulkWriteError as exc:
                if any(error.get("code") != 11000 for error in exc.details.get("writeErrors", [])):
                    raise
                # Seqs logged under another batch record: never overwrite the log, report it.
                log.error("seqs %d-%d of batch %s are already in the log under another batch; not rewritten",
                          batch.first_seq, batch.last_seq, batch.batch_id)
                return False
        except (PyMongoError, asyncio.CancelledError):
            await self._abandon(session)
            raise
        return True

    async def _state_changes(self, events: Iterable[Event], session: Any) -> list[DeleteOne | ReplaceOne]:
        """The state writes that apply ``events`` exactly as :meth:`dlopbox.tree.Tree.apply` would.

        Only the part of the state the events read is loaded (attrib, rmdir and move targets
        and the subtrees of directories they remove or move); the events are applied to
        that part in memory and the differences are written, one operation per path.
        """
        events = list(events)
        exact: set[str] = set()
        for e in events:
            if e.op is Op.ATTRIB or e.op is Op.RMDIR:
                exact.add(e.path)
            elif e.op is Op.MOVE:
                exact.update(e.paths())
        loaded = await self._load_exact(exact, session)
        dirs = {p for p in exact if p in loaded and loaded[p].is_dir}
        for directory in sorted(dirs):
            if any(ancestor in dirs for ancestor in ancestors(directory)):
                continue  # already inside a subtree being loaded
            async for doc in self.state.find({"_id": subtree(directory)}, session=session):
                loaded[doc["path"]] = entry_from_doc(doc)
        tree = Tree(loaded.values())
        touched: set[str] = set()
        for e in events:
            tree.apply(e)
            touched.update(e.paths())
        changes: list[DeleteOne | ReplaceOne] = []
        for path in sorted(loaded.keys() | tree.entries.keys() | touched):
            after = tree.entries.get(path)
            if after is None:
                changes.append(DeleteOne({"_id": path}))
            elif after != loaded.get(path):
                changes.append(ReplaceOne({"_id": path}, state_doc(after), upsert=True))
        return changes

    async def _load_exact(self, paths: set[str], session: Any) -> dict[str, Entry]:
        found: dict[str, Entry] = {}
        ordered = sorted(paths)
        for i in range(0, len(ordered), _IN_CHUNK):
            async for doc in self.state.find({"_id": {"$in": ordered[i:i + _IN_CHUNK]}}, session=session):
                found[doc["path"]] = entry_from_doc(doc)
        return found

    async def mark_journaled(self, seq: int) -> None:
        """Remember that every batch up to ``seq`` has been seen in the journal (so was published)."""
        await self.meta.update_one({"_id": "journal"}, {"$max": {"seq": seq}}, upsert=True)

    async def set_progress(self, client_id: str, seq: int, local_differences: int | None | EllipsisType = ...
                           ) -> None:
        """Record a client's report; ``local_differences`` left out (``...``) keeps the one reported before."""
        update: dict[str, Any] = {"$set": {"seq": seq, "last_seen": datetime.now(UTC)}}
        if local_differences is None:
            update["$unset"] = {"local_differences": ""}
        elif not isinstance(local_differences, EllipsisType):
            update["$set"]["local_differences"] = local_differences
        await self.clients.update_one({"_id": client_id}, update, upsert=True)

    async def set_master(self, doc: dict[str, Any]) -> None:
        """The watcher's last report (see :mod:`.master`), one document."""
        await self.meta.replace_one({"_id": "master"}, {"_id": "master", **doc}, upsert=True)

    async def master(self) -> dict[str, Any] | None:
        return await self.meta.find_one({"_id": "master"})

    # -- reading ---------------------------------------------------------------------------

    async def _meta_seq(self, name: str) -> int:
        doc = await self.meta.find_one({"_id": name})
        return int(doc["seq"]) if doc else 0

    async def head(self) -> int:
        """The last logged seq (the head doc, checked against the log itself)."""
        head = await self._meta_seq("head")
        later = await self.events.find_one({"seq": {"$gt": head}}, sort=[("seq", -1)])
        return int(later["seq"]) if later else head

    async def journaled_through(self) -> int:
        return await self._meta_seq("journal")

    async def recent_batches(self, limit: int) -> list[tuple[str, int, int]]:
        """(batch_id, first_seq, last_seq) of the last ``limit`` logged batches, oldest first."""
        docs = await self.batches.find().sort("_id", -1).limit(limit).to_list()
        return [(d["batch_id"], int(d["_id"]), int(d["last_seq"])) for d in reversed(docs)]

    async def batches_after(self, seq: int) -> AsyncIterator[Batch]:
        """Every logged batch whose first seq is above ``seq``, rebuilt from its rows, in order."""
        records = await self.batches.find({"_id": {"$gt": seq}}).sort("_id", 1).to_list()
        for record in records:
            rows = await self.events.find({"seq": {"$gte": record["_id"], "$lte": record["last_seq"]}}).sort(
                "seq", 1).to_list()
            yield Batch(record["batch_id"], tuple(Event.from_dict(event_from_doc(r)) for r in rows))

    async def events_since(self, since: int, prefix: str | None, limit: int) -> list[dict[str, Any]]:
        """Logged events with seq > ``since`` that affect ``prefix``, ascending.

        The same selection as :meth:`dlopbox.events.Event.affects`: on ``prefix`` or below it,
        or a removal or move of a directory above it.
        """
        query: dict[str, Any] = {"seq": {"$gt": since}}
        if prefix is not None:
            query["$or"] = [{"path": prefix}, {"path": subtree(prefix)}, {"dest": prefix}, {"dest": subtree(prefix)}]
            above = list(ancestors(prefix))
            if above:
                query["$or"] += [{"path": {"$in": above}, "op": {"$in": [Op.RMDIR.value, Op.MOVE.value]}},
                                 {"dest": {"$in": above}}]
        docs = await self.events.find(query).sort("seq", 1).limit(limit).to_list()
        return [event_from_doc(d) for d in docs]

    def state_cursor(self) -> Any:
        """Every state document sorted by path: a parent sorts before anything below it."""
        return self.state.find({}, {"_id": 0}).sort("_id", 1).batch_size(5000)

    async def client_progress(self) -> list[dict[str, Any]]:
        return await self.clients.find().sort("_id", 1).to_list()

