"""watcher.KnownTree: the watcher's tree with a children index behaves exactly like a Tree."""

from __future__ import annotations

from hypothesis import given, settings

from dlopbox.tree import Tree
from dlopbox.watcher import KnownTree
from tests.test_watcher_delivery import histories


@settings(max_examples=500, deadline=None)
@given(histories())
def test_known_tree_applies_events_like_a_tree_and_finds_every_subtree(history):
    base, changes = history
    plain, known = Tree(base.entries.values()), KnownTree(base.entries.values())
    for event, _ in changes:
        plain.apply(event)
        known.apply(event)
        assert known.entries == plain.entries
        for path, entry in plain.entries.items():
            if entry.is_dir:
                assert sorted(known.below(path)) == sorted(plain.below(path))
                assert sorted(e.path for e in known.subtree(path)) == sorted([path, *plain.below(path)])
    indexed = {p for children in known._index.children.values() for p in children}
    assert indexed == set(known.entries)
