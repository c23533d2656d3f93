"""tree.py: scanning never follows links, and diff turns any tree into any other."""

from __future__ import annotations

import dataclasses
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from dlopbox.events import Entry, Event, Op
from dlopbox.tree import Ignore, Tree, diff, file_digest, scan


def strip_seq(tree: Tree) -> dict[str, Entry]:
    return {p: dataclasses.replace(e, seq=None) for p, e in tree.entries.items()}


@st.composite
def trees(draw) -> Tree:
    names = st.sampled_from(["a", "b", "报告", "c d", "😀"])
    entries: dict[str, Entry] = {}
    for parts in draw(st.lists(st.lists(names, min_size=1, max_size=3), max_size=12)):
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in entries and not entries[parent].is_dir:
                break
            entries.setdefault(parent, Entry(parent, True, mode=draw(st.sampled_from([0o755, 0o700]))))
        else:
            path = "/".join(parts)
            if path in entries:
                continue
            if draw(st.booleans()):
                entries[path] = Entry(path, True, mode=0o755)
            else:
                entries[path] = Entry(path, False, size=draw(st.integers(0, 3)), mtime_ns=draw(st.integers(0, 2)),
                                      mode=draw(st.sampled_from([0o644, 0o600])), digest=draw(st.sampled_from(["aa" * 32, "bb" * 32])))
    return Tree(entries.values())


@settings(max_examples=300)
@given(trees(), trees())
def test_diff_turns_any_tree_into_any_other(old, new):
    result = Tree(old.entries.values())
    for event in diff(old, new):
        result.apply(event)
    assert strip_seq(result) == strip_seq(new)
    assert diff(new, new) == []


def test_apply_move_of_a_directory_moves_its_subtree_and_replaces_the_destination():
    tree = Tree([Entry("d", True, mode=0o755), Entry("d/f", False, 1, 1, 0o644, "aa" * 32),
                 Entry("e", True, mode=0o755), Entry("e/old", False, 1, 1, 0o644, "bb" * 32)])
    tree.apply(Event(Op.MOVE, "d", dest="e", is_dir=True, seq=7))
    assert sorted(tree.entries) == ["e", "e/f"]
    assert tree.get("e/f").seq == 7


def test_scan_skips_links_specials_ignored_and_reserved_names(tmp_path):
    (tmp_path / "目录").mkdir()
    (tmp_path / "目录" / "文件.txt").write_bytes(b"hello")
    (tmp_path / "x.swp").write_text("swap")
    (tmp_path / ".dlopbox-tmp-1").write_text("temp")
    os.symlink("/etc/passwd", tmp_path / "link")
    os.symlink("/etc", tmp_path / "dirlink")
    os.mkfifo(tmp_path / "fifo")
    tree = scan(tmp_path, Ignore(["*.swp"]))
    assert sorted(tree.entries) == ["目录", "目录/文件.txt"]
    entry = tree.get("目录/文件.txt")
    assert entry.size == 5 and entry.digest == file_digest(tmp_path / "目录" / "文件.txt")


def test_scan_reuses_known_digests_when_size_and_mtime_match(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    first = scan(tmp_path)
    known = Tree([dataclasses.replace(first.get("f"), digest="cc" * 32)])
    assert scan(tmp_path, previous=known).get("f").digest == "cc" * 32
    os.utime(tmp_path / "f", ns=(1, 1))
    assert scan(tmp_path, previous=known).get("f").digest == first.get("f").digest
