"""Tree: derived views on literal trees, round trips through every format, validation errors,
and every readable growmap of the original Sequoia repository."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sequoia.errors import ConfigError, FileFormatError, TreeError
from sequoia.tree import EXPORT_FORMATS, Tree, export, load_growmap
from sequoia.files import read_json, write_atomic

SHARED_GROWMAPS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "growmaps"  # ../shared beside the project
GROWMAPS_ENV = "SEQUOIA_GROWMAPS"

CHAIN = Tree((-1, 0, 1, 2))  # 0 -> 1 -> 2 -> 3
TWO_BY_TWO = Tree((-1, 0, 0, 1, 1, 2, 2))  # root, 2 children, 2 grandchildren each


@st.composite
def trees(draw, max_nodes: int = 24) -> Tree:
    """Random ordered trees: each node in BFS order draws its number of children."""
    parents, node = [-1], 0
    while node < len(parents) and len(parents) < max_nodes:
        parents += [node] * draw(st.integers(0, min(3, max_nodes - len(parents))))
        node += 1
    return Tree(tuple(parents))


# ---------------------------------------------------------------------- literal views
def test_chain_views() -> None:
    assert CHAIN.size == len(CHAIN) == 4 and CHAIN.depth == 3
    assert CHAIN.depths.tolist() == [0, 1, 2, 3] and CHAIN.ranks.tolist() == [0, 0, 0, 0]
    assert torch.equal(CHAIN.ancestor_mask, torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    assert CHAIN.position_ids(10).tolist() == [10, 11, 12, 13]
    assert CHAIN.to_choices() == [[0], [0, 0], [0, 0, 0]]


def test_two_by_two_views() -> None:
    t = TWO_BY_TWO
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 2, 2]
    assert t.ranks.tolist() == [0, 0, 1, 0, 1, 0, 1]
    assert t.children == ((1, 2), (3, 4), (5, 6), (), (), (), ())
    assert t.levels == ((0,), (1, 2), (3, 4, 5, 6))
    assert t.path_to(5) == [0, 2, 5] and t.paths[5] == (1, 0)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0, 0],
            [1, 1, 0, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 0, 1, 0, 0, 1, 0],
            [1, 0, 1, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(t.ancestor_mask, expected)
    assert t.position_ids(7).tolist() == [7, 8, 8, 9, 9, 9, 9]
    assert t.to_vllm_tree() == "[(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]"


def test_expansions_say_which_candidates_become_children() -> None:
    # root -> {1, 2, 3}; 1 -> {4, 5}; 3 -> {6}; 4 -> {7}
    tree = Tree.from_children_counts([3, 2, 0, 1, 1, 0, 0])
    plans = [(e.parents.tolist(), e.keep.int().tolist()) for e in tree.expansions]
    assert plans == [([0], [[1, 1, 1]]), ([1, 3], [[1, 1], [1, 0]]), ([4], [[1]])]
    candidates = torch.tensor([[10, 11], [12, 13]])
    assert tree.expansions[1].children(candidates).tolist() == [10, 11, 12]  # = candidates[keep]
    assert tree.expansions[0].kept is None and tree.expansions[0].children(candidates).tolist() == [10, 11, 12, 13]
    assert len(CHAIN.expansions) == CHAIN.depth and Tree.from_children_counts([0]).expansions == ()


def test_hand_written_growmap_in_the_original_layout() -> None:
    # root -> {1, 2}; 1 -> {3}. The original expands every node level by level, leaves
    # included (0 branches), and stores a long 0/1 mask and a LongTensor of depths.
    growmap = {
        "roots": [[0], [1, 2], [3]],
        "branches": [[2], [1, 0], [0]],
        "Successors": [[1, 2], [3], [], []],
        "mask": torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]),
        "depth": torch.LongTensor([0, 1, 1, 2]),
        "size": 4,
    }
    tree = Tree.from_growmap(growmap)
    assert tree.parents == (-1, 0, 0, 1)
    _assert_same_growmap(tree.to_growmap(), growmap)


# ---------------------------------------------------------------------- round trips
@settings(max_examples=60, deadline=None)
@given(trees())
def test_round_trips_json_choices_growmap(tree: Tree) -> None:
    assert Tree.from_json(json.loads(json.dumps(tree.to_json()))) == tree
    assert Tree.from_choices(tree.to_choices()) == tree
    buffer = io.BytesIO()
    torch.save(tree.to_growmap(), buffer)
    buffer.seek(0)
    assert Tree.from_growmap(torch.load(buffer, weights_only=True)) == tree


@settings(max_examples=60, deadline=None)
@given(trees())
def test_derived_views_agree(tree: Tree) -> None:
    mask = tree.ancestor_mask
    for node in range(tree.size):
        path = tree.path_to(node)
        assert mask[node].nonzero().flatten().tolist() == path
        assert len(path) - 1 == tree.depths[node]
        assert [int(tree.ranks[v]) for v in path[1:]] == list(tree.paths[node])
    assert sorted(v for level in tree.levels for v in level) == list(range(tree.size))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 3), max_size=4))
def test_uniform_trees_round_trip_through_vllm(widths: list[int]) -> None:
    counts, per_level = [], 1
    for w in widths:
        counts += [w] * per_level
        per_level *= w
    tree = Tree.from_children_counts(counts)
    assert Tree.from_vllm_tree(tree.to_vllm_tree()) == tree


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_export_writes_a_file_that_reads_back(fmt: str, tmp_path: Path) -> None:
    out = tmp_path / f"tree.{'pt' if fmt == 'growmap' else 'json'}"
    export(TWO_BY_TWO, fmt, out)
    if fmt in ("json", "growmap"):
        back = Tree.load(out)
    elif fmt == "medusa":
        back = Tree.from_choices(read_json(out))
    else:
        back = Tree.from_vllm_tree(read_json(out)["speculative_token_tree"])
    assert back == TWO_BY_TWO
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left behind


def test_tree_file_keeps_meta(tmp_path: Path) -> None:
    tree = Tree((-1, 0), {"budget": 2, "expected_tokens": 1.5})
    tree.save(tmp_path / "t.json")
    loaded = Tree.load(tmp_path / "t.json")
    assert loaded.meta == tree.meta and read_json(tmp_path / "t.json")["format"] == "sequoia-tree/1"


# ---------------------------------------------------------------------- validation errors
@pytest.mark.parametrize(
    ("parents", "words"),
    [
        ((), "at least the root"),
        ((0, 0), "node 0 must be the root"),
        ((-1, 0, 3, 1), "parents must precede"),
        ((-1, 0, -1), "parents must precede"),
        ((-1, 0, 0, 2, 1), "not in BFS order"),
    ],
)
def test_bad_parents(parents: tuple[int, ...], words: str) -> None:
    with pytest.raises(TreeError, match=words):
        Tree(parents)


@pytest.mark.parametrize(
    ("paths", "words"),
    [
        ([[0], [0, 0, 0]], "no parent path"),
        ([[0], [2]], "contiguous"),
        ([[-1]], "negative rank"),
        ([[0.5]], "whole-number"),
    ],
)
def test_bad_choices(paths: list, words: str) -> None:
    with pytest.raises(TreeError, match=words):
        Tree.from_choices(paths)


def test_vllm_errors() -> None:
    with pytest.raises(TreeError, match="not a vLLM tree string"):
        Tree.from_vllm_tree("[(0,")
    with pytest.raises(TreeError, match="level 1 has nodes with"):
        Tree((-1, 0, 0, 1)).to_vllm_tree()


@pytest.mark.parametrize(
    ("growmap", "words"),
    [
        ({"Successors": [[1], [2], [1]]}, "two parents or closes a cycle"),
        ({"Successors": [[1], [0]]}, "two parents or closes a cycle"),
        ({"Successors": [[1], [], []]}, "unreachable"),
        ({"Successors": [[5]]}, "outside"),
        ({"Successors": [[2, 1], [], []]}, "out of order"),
        ({"Successors": [[1], []], "size": 3}, "size 3"),
        ({"Successors": [["a"]]}, "lists of node ids"),
        ({"Successors": [[1], []], "depth": [0, 2]}, "'depth' disagrees"),
        ({"Successors": [[1], []], "mask": torch.eye(2)}, "'mask' disagrees"),
        ({"roots": [[0]]}, "no 'Successors'"),
    ],
)
def test_bad_growmaps(growmap: dict, words: str) -> None:
    with pytest.raises(TreeError, match=words):
        Tree.from_growmap(growmap)


@pytest.mark.parametrize(
    ("text", "error", "words"),
    [
        ("{not json", FileFormatError, "is not valid JSON"),
        ('{"format": "other/1", "parents": [-1]}', FileFormatError, "not a sequoia-tree/1"),
        ('{"format": "sequoia-tree/1", "parents": [-1, true]}', TreeError, "list of integers"),
        ('{"format": "sequoia-tree/1", "parents": [-1], "meta": 3}', FileFormatError, "'meta'"),
    ],
)
def test_bad_tree_files(text: str, error: type, words: str, tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(text)
    with pytest.raises(error, match=words):
        Tree.load(tmp_path / "t.json")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="not found"):
        Tree.load(tmp_path / "nope.json")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(FileFormatError, match="not a readable growmap"):
        Tree.load(tmp_path / "bad.pt")


def test_failed_exports_leave_no_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown export format 'dot'"):
        export(TWO_BY_TWO, "dot", tmp_path / "t.dot")
    with pytest.raises(TreeError):
        export(Tree((-1, 0, 0, 1)), "vllm", tmp_path / "t.json")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(tmp_path / "x.json", broken)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- original repository
def _original_growmaps() -> list[Path]:
    """The original repository's growmaps: ``../shared/fixtures/growmaps`` beside the project
    when present, else the directory ``$SEQUOIA_GROWMAPS`` names; skip only when neither exists."""
    for folder in (SHARED_GROWMAPS, Path(os.environ.get(GROWMAPS_ENV, "") or SHARED_GROWMAPS)):
        files = sorted(folder.glob("*.pt")) if folder.is_dir() else []
        if files:
            return files
    pytest.skip(f"no original growmaps in {SHARED_GROWMAPS} and ${GROWMAPS_ENV} is unset or empty")


def _assert_same_growmap(ours: dict, theirs: dict) -> None:
    assert ours["size"] == theirs["size"]
    for key in ("roots", "branches", "Successors"):
        assert [list(map(int, x)) for x in ours[key]] == [list(map(int, x)) for x in theirs[key]]
    assert torch.equal(ours["mask"], theirs["mask"].long())
    assert torch.equal(ours["depth"], theirs["depth"].long())


def test_every_readable_original_growmap_round_trips(tmp_path: Path) -> None:
    loaded = 0
    for path in _original_growmaps():
        growmap = load_growmap(path)
        if not isinstance(growmap, dict):  # acceptance-rate-vector.pt is a bare tensor
            continue
        tree = Tree.load(path)
        _assert_same_growmap(tree.to_growmap(), growmap)
        export(tree, "growmap", tmp_path / "again.pt")
        assert Tree.load(tmp_path / "again.pt") == tree
        loaded += 1
    assert loaded >= 1, "no readable growmap among the fixtures"
