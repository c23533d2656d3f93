"""Tree's children index: subtrees found through it match a scan of every path, through any history."""

from __future__ import annotations

from hypothesis import given, settings

from dlopbox.tree import Tree
from tests.test_watcher_delivery import histories


@settings(max_examples=500, deadline=None)
@given(histories())
def test_the_index_finds_every_subtree_through_any_history(history):
    base, changes = history
    tree = Tree(base.entries.values())
    for event, _ in changes:
        tree.apply(event)
        for path, entry in tree.entries.items():
            if entry.is_dir:
                scanned = sorted(p for p in tree.entries if p.startswith(path + "/"))
                assert sorted(tree.below(path)) == scanned
                assert sorted(e.path for e in tree.subtree(path)) == sorted([path, *scanned])
    indexed = {p for children in tree.entries.children.values() for p in children}
    assert indexed == set(tree.entries)
