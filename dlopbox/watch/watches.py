"""One inotify watch per directory, and the current path of each.

inotify is not recursive: :class:`Watches` adds a watch the moment a directory appears and
only then lists it, so nothing written into it early is missed. Moving a directory is
re-parenting one node: the paths of everything below it follow.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from asyncinotify import Inotify, Mask, Watch

from ..paths import MAX_PATH_BYTES, parent_of
from ..tree import Ignore
from .disk import safe

log = logging.getLogger(__name__)

WATCH_MASK = (Mask.CREATE | Mask.MODIFY | Mask.CLOSE_WRITE | Mask.ATTRIB | Mask.DELETE | Mask.MOVED_FROM
              | Mask.MOVED_TO | Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.ONLYDIR | Mask.DONT_FOLLOW | Mask.EXCL_UNLINK)


class Dir:
    """A watched directory: its watch and where it is now (its name in its parent)."""

    __slots__ = ("watch", "name", "parent", "children", "rel")

    def __init__(self, watch: Watch, name: str, parent: Dir | None) -> None:
        self.watch = watch
        self.name = name
        self.parent = parent
        self.children: dict[str, Dir] = {}
        self.rel = ""  # its path below the root, kept current by Watches

    def subtree(self) -> Iterator[Dir]:
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())



def safe_name(rel: str, name: str) -> bool:
    """``safe(rel)`` for ``name`` from the kernel inside an already checked directory.

    The kernel never reports ``.``, ``..``, a ``/`` or a name over NAME_MAX, and the
    directory's own path was checked when it was watched: what is left is the encoding
    (a name that is not UTF-8 arrives with surrogates) and the length of the whole path.
    """
    if not name.isascii():
        try:
            name.encode()
        except UnicodeEncodeError:
            return False
    return len(rel) * 4 <= MAX_PATH_BYTES or len(rel.encode()) <= MAX_PATH_BYTES



class Watches:
    """A watch on every directory of the tree; moving a directory is re-parenting one node."""

    def __init__(self, inotify: Inotify, root: Path, ignore: Ignore) -> None:
        self.inotify = inotify
        self.root = root
        self.ignore = ignore
        self.by_wd: dict[int, Dir] = {}
        self.top: Dir | None = None

    def __len__(self) -> int:
        return len(self.by_wd)

    def find(self, rel: str) -> Dir | None:
        node = self.top
        if rel:
            for part in rel.split("/"):
                if node is None:
                    return None
                node = node.children.get(part)
        return node

    def watch_tree(self, rel: str) -> None:
        """Watch ``rel`` and every directory below it, each before listing it; forget the ones gone.

        This runs on the event loop: a watch added from a thread could report an event
        before its owner knows it, and that event would be lost.
        """
        if rel and self.find(parent_of(rel)) is None:
            return
        seen: set[int] = set()
        stack = [rel]
        while stack:
            current = stack.pop()
            path = self.root / current if current else self.root
            try:
                watch = self.inotify.add_watch(path, WATCH_MASK)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    log.error("cannot watch %s: no inotify watches left (raise fs.inotify.max_user_watches)", path)
                elif exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    log.warning("cannot watch %s: %s", path, exc)
                continue
            if not self._place(watch, current):
                continue
            seen.add(watch.wd)
            try:
                with os.scandir(path) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False) and not self.ignore(entry.name):
                            child = f"{current}/{entry.name}" if current else entry.name
                            if safe(child):
                                stack.append(child)
            except OSError:
                continue
        top = self.find(rel)
        if top is not None:
            for node in list(top.subtree()):
                if node.watch.wd not in seen:
                    self.forget(node)

    def _place(self, watch: Watch, rel: str) -> bool:
        node = self.by_wd.get(watch.wd)
        if node is None:
            node = self.by_wd[watch.wd] = Dir(watch, "", None)
        if not rel:
            self._detach(node)
            self.top = node
            node.rel = node.name = ""
            return True
        parent = self.find(parent_of(rel))
        if parent is None:
            self.forget(node)
            return False
        self.move(node, parent, rel.rpartition("/")[2])
        return True

    def move(self, node: Dir, parent: Dir, name: str) -> None:
        """``node`` is now ``name`` in ``parent`` (what it replaced there is gone)."""
        self._detach(node)
        replaced = parent.children.get(name)
        if replaced is not None and replaced is not node:
            self.forget(replaced)
        node.parent = parent
        node.name = name
        parent.children[name] = node
        for sub in node.subtree():  # parents come before their children
            assert sub.parent is not None
            sub.rel = f"{sub.parent.rel}/{sub.name}" if sub.parent.rel else sub.name

    def forget(self, node: Dir) -> None:
        """Stop watching ``node`` and everything below it."""
        self._detach(node)
        for sub in list(node.subtree()):
            if self.by_wd.get(sub.watch.wd) is sub:
                del self.by_wd[sub.watch.wd]
                # The kernel has already dropped the watch when its directory was deleted.
                with contextlib.suppress(OSError):
                    self.inotify.rm_watch(sub.watch)
        if node is self.top:
            self.top = None

    @staticmethod
    def _detach(node: Dir) -> None:
        if node.parent is not None and node.parent.children.get(node.name) is node:
            del node.parent.children[node.name]
        node.parent = None

