"""paths.py refuses every hostile path and accepts every name a real user types."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlopbox.paths import UnsafePathError, check_relpath, resolve, to_relpath, url_path

GOOD = [
    "报告.txt",
    "项目/二〇二六/季度报告 (最终版).docx",
    "emoji 😀🎉/文件 #1.txt",
    "spaces in name/and more spaces",
    "quotes ' and \" and `",
    "percent%20sign%",
    "hash#tag",
    "question?mark",
    "semi;colon",
    "a" * 255,
    "/".join(["d" * 255] * 15),
    "-leading-dash",
    ".hidden",
    "...",
    "back\\slash",
]

BAD = {
    "": "empty",
    "/etc/passwd": "absolute",
    "../../etc/passwd": "'..'",
    "a/../../b": "'..'",
    "a/./b": "'.'",
    "a//b": "empty component",
    "a/": "empty component",
    "nul\x00byte": "NUL",
    "a" * 256: "255",
    "/".join(["d" * 200] * 21): "4096",
    ".dlopbox-tmp-123": "reserved",
    "dir/.dlopbox/state": "reserved",
}


@pytest.mark.parametrize("path", GOOD)
def test_accepts_real_names(path):
    assert check_relpath(path) == path


@pytest.mark.parametrize(("path", "reason"), BAD.items())
def test_refuses_hostile_paths(path, reason):
    with pytest.raises(UnsafePathError, match=reason):
        check_relpath(path)


@pytest.mark.parametrize("value", [None, 3, b"bytes", ["a"]])
def test_refuses_non_strings(value):
    with pytest.raises(UnsafePathError, match="string"):
        check_relpath(value)


def test_refuses_lone_surrogates():
    with pytest.raises(UnsafePathError, match="UTF-8"):
        check_relpath("bad\udcff")


_component = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=40
).filter(lambda s: s not in (".", "..") and not s.startswith(".dlopbox"))


@given(st.lists(_component, min_size=1, max_size=6))
def test_any_well_formed_path_round_trips_through_url_and_disk_form(parts):
    path = "/".join(parts)
    assert check_relpath(path) == path
    from urllib.parse import unquote

    assert unquote(url_path(path)) == path
    assert to_relpath("/root", "/root/" + path) == path


def test_resolve_stays_inside_and_never_follows_a_symlinked_parent(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside, root / "link")
    assert resolve(root, "real/新文件.txt") == root / "real" / "新文件.txt"
    assert resolve(root, "missing/deeper/file") == root / "missing" / "deeper" / "file"
    with pytest.raises(UnsafePathError, match="symlink"):
        resolve(root, "link/passwd")
    with pytest.raises(UnsafePathError, match="'..'"):
        resolve(root, "../outside/x")
    (root / "file").write_text("x")
    with pytest.raises(UnsafePathError, match="not a directory"):
        resolve(root, "file/below")
    with pytest.raises(UnsafePathError, match="does not exist"):
        resolve(root, "missing/x", parents_must_exist=True)


def test_to_relpath_refuses_paths_outside_the_root(tmp_path):
    with pytest.raises(UnsafePathError, match="outside"):
        to_relpath(tmp_path / "root", tmp_path / "elsewhere")
