"""``sequoia tree``: every command's happy path, and bad input -> one line, exit 2, no file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sequoia.solver import expected_tokens, solve
from sequoia.tree import Tree
from sequoia.files import read_json
from sequoia_cli.main import app
from cli_helpers import assert_user_error

runner = CliRunner()
P = "0.62,0.13,0.05"


def ok(*args: str) -> str:
    result = runner.invoke(app, ["tree", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def fails(*args: str, words: str) -> None:
    """The command exits 2 with exactly one error line mentioning ``words``."""
    assert_user_error(runner.invoke(app, ["tree", *args]), words)


@pytest.fixture
def two_by_two(tmp_path: Path) -> Path:
    path = tmp_path / "2x2.json"
    ok("build", "--shape", "kary", "--width", "2", "--depth", "2", "--out", str(path))
    return path


# ---------------------------------------------------------------------- build
def test_build_optimal_tree_from_inline_vector(tmp_path: Path) -> None:
    out = tmp_path / "tree.json"
    assert "16 nodes" in ok("build", "--p", P, "--budget", "16", "--max-depth", "5", "--out", str(out))
    data = read_json(out)
    assert data["format"] == "sequoia-tree/1"
    meta, best = data["meta"], solve([0.62, 0.13, 0.05], 16, 5)
    assert meta == {"acceptance": [0.62, 0.13, 0.05], "budget": 16, "max_depth": 5,
                    "expected_tokens": pytest.approx(best.values[16, 5])}
    assert Tree.load(out) == best.tree(16, 5)


def test_build_from_acceptance_file(tmp_path: Path) -> None:
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"format": "sequoia-acceptance/1", "target": "t", "vector": [0.7, 0.2]}))
    ok("build", "--acceptance", str(acc), "--budget", "8", "--max-depth", "3", "--out", str(tmp_path / "t.json"))
    assert Tree.load(tmp_path / "t.json").meta["acceptance"] == [0.7, 0.2]


def test_build_from_acceptance_rows_by_depth(tmp_path: Path) -> None:
    rows = [[0.7, 0.2], [0.4, 0.1]]
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"format": "sequoia-acceptance/1", "target": "t", "vector": rows[0], "by_depth": rows}))
    ok("build", "--acceptance", str(acc), "--budget", "8", "--max-depth", "3", "--out", str(tmp_path / "t.json"))
    tree = Tree.load(tmp_path / "t.json")
    assert tree.meta["acceptance"] == rows and tree == solve(rows, 8, 3).tree(8, 3)
    assert tree.meta["expected_tokens"] == pytest.approx(solve(rows, 8, 3).values[8, 3])
    assert tree.meta["expected_tokens"] < solve(rows[0], 8, 3).values[8, 3]  # the weaker depths count
    acc.write_text(json.dumps({"format": "sequoia-acceptance/1", "target": "t", "vector": [0.7], "by_depth": [[0.7], [0.9, 0.2]]}))
    fails("build", "--acceptance", str(acc), "--budget", "8", "--out", str(tmp_path / "u.json"), words="acceptance")
    assert not (tmp_path / "u.json").exists()


def test_build_fixed_and_best_baselines(tmp_path: Path, two_by_two: Path) -> None:
    assert Tree.load(two_by_two).parents == (-1, 0, 0, 1, 1, 2, 2)
    ok("build", "--shape", "chain", "--depth", "3", "--p", "0.5", "--out", str(tmp_path / "c.json"))
    chain = Tree.load(tmp_path / "c.json")
    assert chain.parents == (-1, 0, 1, 2) and chain.meta["expected_tokens"] == 1.875
    ok("build", "--shape", "chains", "--p", P, "--budget", "9", "--max-depth", "4", "--out", str(tmp_path / "s.json"))
    chains = Tree.load(tmp_path / "s.json")
    assert chains.size <= 9 and chains.meta["shape"] == "chains"
    assert chains.meta["expected_tokens"] == pytest.approx(expected_tokens(chains, [0.62, 0.13, 0.05]))


BAD_BUILDS = [
    (["--p", "0.5,-0.1", "--budget", "8"], "entry #2 is -0.1"),
    (["--p", "0.5,nan", "--budget", "8"], "entry #2 is nan"),
    (["--p", "0.7,0.4", "--budget", "8"], "sums to 1.1 > 1"),
    (["--p", "0.5,x", "--budget", "8"], "comma-separated numbers"),
    (["--p", "0.5", "--budget", "0"], "size budget must be at least 1"),
    (["--p", "0.5", "--budget", "8", "--max-depth", "-1"], "depth limit"),
    (["--p", "0.5"], "needs --budget"),
    (["--budget", "8"], "needs an acceptance vector"),
    (["--shape", "star", "--p", "0.5", "--budget", "8"], "unknown tree shape 'star'"),
    (["--shape", "kary", "--depth", "3"], "also needs --width"),
    (["--shape", "kary", "--width", "16", "--depth", "32"], "exceeds"),
    (["--p", "0.5", "--budget", "100000"], "too large"),
]


@pytest.mark.parametrize(("args", "words"), BAD_BUILDS)
def test_bad_build_input(args: list[str], words: str, tmp_path: Path) -> None:
    fails("build", *args, "--out", str(tmp_path / "t.json"), words=words)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("text", "words"),
    [("{broken", "is not valid JSON"), ('{"format": "sequoia-tree/1"}', "not a sequoia-acceptance/1"),
     ('{"format": "sequoia-acceptance/1", "target": "t", "vector": [0.9, 0.9]}', "sums to 1.8 > 1")],
)
def test_bad_acceptance_file(text: str, words: str, tmp_path: Path) -> None:
    (tmp_path / "acc.json").write_text(text)
    fails("build", "--acceptance", str(tmp_path / "acc.json"), "--budget", "4", "--out", str(tmp_path / "t.json"),
          words=words)
    assert not (tmp_path / "t.json").exists()


def test_both_acceptance_sources_is_an_error(tmp_path: Path) -> None:
    fails("build", "--acceptance", "a.json", "--p", P, "--budget", "4", "--out", str(tmp_path / "t.json"),
          words="not both")


# ---------------------------------------------------------------------- show
def test_show_tree_view_and_table(tmp_path: Path, two_by_two: Path) -> None:
    out = ok("show", str(two_by_two), "--p", "0.5,0.25")
    assert "rank 1  reach 0.0625" in out and "7 nodes, depth 2, 2.3125 expected tokens" in out
    table = ok("show", str(two_by_two), "--table")
    assert "parent" in table and "7 nodes, depth 2" in table and "expected" not in table


def test_show_uses_the_files_acceptance_vector(tmp_path: Path) -> None:
    ok("build", "--p", "0.5", "--budget", "3", "--max-depth", "2", "--out", str(tmp_path / "t.json"))
    assert "1.7500 expected tokens" in ok("show", str(tmp_path / "t.json"))


def test_show_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{oops")
    fails("show", str(tmp_path / "bad.json"), words="is not valid JSON")
    fails("show", str(tmp_path / "missing.json"), words="not found")


# ---------------------------------------------------------------------- export / import
@pytest.mark.parametrize("fmt", ["json", "growmap", "medusa", "vllm"])
def test_export_formats(fmt: str, tmp_path: Path, two_by_two: Path) -> None:
    out = tmp_path / "out.bin"
    ok("export", str(two_by_two), "--format", fmt, "--out", str(out))
    if fmt == "growmap":
        assert Tree.from_growmap(torch.load(out, weights_only=True)) == Tree.load(two_by_two)
    elif fmt == "medusa":
        assert read_json(out) == [[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]]
    elif fmt == "vllm":
        assert read_json(out) == {"speculative_token_tree": "[(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]"}
    else:
        assert Tree.load(out) == Tree.load(two_by_two)


def test_export_errors_write_nothing(tmp_path: Path, two_by_two: Path) -> None:
    fails("export", str(two_by_two), "--format", "dot", "--out", str(tmp_path / "x"), words="unknown export format")
    uneven = tmp_path / "uneven.json"
    Tree((-1, 0, 0, 1)).save(uneven)
    fails("export", str(uneven), "--format", "vllm", "--out", str(tmp_path / "x"), words="one child count per level")
    assert not (tmp_path / "x").exists()


def test_import_growmap(tmp_path: Path, two_by_two: Path) -> None:
    ok("export", str(two_by_two), "--format", "growmap", "--out", str(tmp_path / "g.pt"))
    out = ok("import", str(tmp_path / "g.pt"), "--out", str(tmp_path / "back.json"), "--p", "0.5,0.25")
    assert "2.3125 expected tokens" in out
    back = Tree.load(tmp_path / "back.json")
    assert back == Tree.load(two_by_two) and back.meta["source"] == str(tmp_path / "g.pt")


def test_import_bad_growmaps(tmp_path: Path) -> None:
    torch.save({"Successors": [[1], [2], [1]], "size": 3}, tmp_path / "cycle.pt")
    fails("import", str(tmp_path / "cycle.pt"), "--out", str(tmp_path / "t.json"), words="closes a cycle")
    fails("import", str(tmp_path / "none.pt"), "--out", str(tmp_path / "t.json"), words="not found")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    fails("import", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "t.json"), words="not a readable growmap")
    assert not (tmp_path / "t.json").exists()


# ---------------------------------------------------------------------- scaling
def test_scaling_writes_png_json_markdown(tmp_path: Path) -> None:
    out = tmp_path / "res" / "scaling.png"
    text = ok("scaling", "--p", P, "--max-size", "40", "--max-depth", "6", "--out", str(out))
    assert "sequoia" in text and "chains" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = read_json(out.with_suffix(".json"))
    assert data["format"] == "sequoia-scaling/1" and len(data["expected_tokens"]["kary"]) == 40
    assert data["expected_tokens"]["sequoia"][-1] == pytest.approx(solve([0.62, 0.13, 0.05], 40, 6).values[40, 6])
    assert "\n| size | sequoia | chain | kary | chains |\n" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(
    ("args", "words"),
    [(["--p", "0.9,0.2"], "sums to"), (["--p", P, "--max-size", "0"], "size budget"),
     (["--p", P, "--out", "{dir}/scaling.svg"], "must be a .png")],
)
def test_scaling_errors_write_nothing(args: list[str], words: str, tmp_path: Path) -> None:
    args = [a.format(dir=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "scaling.png")]
    fails("scaling", *args, words=words)
    assert not any(tmp_path.iterdir())
