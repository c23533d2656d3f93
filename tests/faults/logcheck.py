"""Audit of the MongoDB event log, run INSIDE the interface container (source passed to python3 -c).

Reads every event row and batch record with pymongo (the container's DLOPBOX_MONGO_URL
carries the credentials) and prints one JSON object:

- ``count``, ``first``, ``last``: the logged seqs;
- ``gaps`` and ``repeated``: seqs missing from 1..last, and seqs logged more than once;
- ``batch_problems``: batch ids logged twice, batch records that do not tile 1..last, rows
  whose batch id is not their batch record's;
- ``redundant``: events that changed nothing when the log is replayed in order (an event
  delivered twice looks like this: the same write, or a delete of what is already gone);
- ``tree``: the log replayed with dlopbox.tree.Tree, as path -> "dir" or "<sha256> <mode>";
- ``state_matches``, ``state_diff``: whether the state collection equals that replay, and where not.
"""

import json
import os
from collections import Counter

import pymongo

from dlopbox.interface.eventlog import entry_from_doc, event_from_doc
from dlopbox.events import Event
from dlopbox.tree import Tree


def key(entry):
    return "dir" if entry.is_dir else "%s %o" % (entry.digest, entry.mode)


def snapshot(tree, event):
    """What an event may change: its paths and everything below them, without seqs."""
    paths = set(event.paths())
    out = {}
    for path in paths:
        if path in tree.entries:
            out[path] = tree.entries[path]
        for below in tree.below(path) if event.op.value in ("rmdir", "move") else ():
            out[below] = tree.entries[below]
    return {p: (e.is_dir, e.size, e.mtime_ns, e.mode, e.digest) for p, e in out.items()}


def main():
    client = pymongo.MongoClient(os.environ["DLOPBOX_MONGO_URL"], serverSelectionTimeoutMS=10000)
    db = client[os.environ.get("DLOPBOX_MONGO_DB", "dlopbox")]
    rows = list(db.events.find({}, {"_id": 0, "logged_at": 0}).sort("seq", 1))
    seqs = [r["seq"] for r in rows]
    last = seqs[-1] if seqs else 0
    counts = Counter(seqs)
    gaps = sorted(set(range(1, last + 1)) - set(counts))
    repeated = sorted(s for s, n in counts.items() if n > 1)

    problems = []
    batches = list(db.batches.find().sort("_id", 1))
    ids = Counter(b["batch_id"] for b in batches)
    problems += ["batch id %s logged %d times" % (i, n) for i, n in ids.items() if n > 1]
    expected = 1
    owner = {}
    for b in batches:
        if b["_id"] != expected:
            problems.append("batch %s starts at seq %d, expected %d" % (b["batch_id"], b["_id"], expected))
        for s in range(b["_id"], b["last_seq"] + 1):
            owner[s] = b["batch_id"]
        expected = b["last_seq"] + 1
    if batches and expected != last + 1:
        problems.append("batch records end at seq %d, the log at %d" % (expected - 1, last))
    problems += ["seq %d is in batch %s, its row says %s" % (r["seq"], owner.get(r["seq"]), r.get("batch_id"))
                 for r in rows if owner.get(r["seq"]) != r.get("batch_id")][:20]

    tree = Tree()
    redundant = []
    for row in rows:
        event = Event.from_dict(event_from_doc(row))
        before = snapshot(tree, event)
        tree.apply(event)
        if snapshot(tree, event) == before:
            redundant.append(event.to_dict())
    replayed = {p: key(e) for p, e in tree.entries.items()}
    state = {d["path"]: key(entry_from_doc(d)) for d in db.state.find()}
    print(json.dumps({"count": len(rows), "first": seqs[0] if seqs else 0, "last": last, "gaps": gaps[:50],
                      "gap_count": len(gaps), "repeated": repeated[:50], "batch_problems": problems[:50],
                      "batches": len(batches), "redundant": redundant[:20], "redundant_count": len(redundant),
                      "redundant_seqs": [e.get("seq", 0) for e in redundant],
                      "tree": replayed, "state_matches": state == replayed,
                      "state_diff": sorted(p for p in state.keys() | replayed.keys()
                                           if state.get(p) != replayed.get(p))}, ensure_ascii=False))


main()
