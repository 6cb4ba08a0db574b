"""The acceptance file format and (once an engine exists) the measurement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sequoia.acceptance import ACCEPTANCE_FORMAT, AcceptanceResult
from sequoia.errors import AcceptanceError, FileFormatError

FIELDS = dict(target="t", draft="d", mode="greedy", temperature=0.0, top_p=1.0, prompts="builtin")


def test_from_counts_and_round_trip(tmp_path):
    result = AcceptanceResult.from_counts(np.array([50, 20, 5]), samples=100, **FIELDS)
    assert result.vector == (0.5, 0.2, 0.05)
    assert result.stderr[0] == pytest.approx(0.05)  # sqrt(0.5 * 0.5 / 100)
    path = tmp_path / "acc.json"
    result.save(path)
    assert json.loads(path.read_text())["format"] == ACCEPTANCE_FORMAT
    assert AcceptanceResult.load(path) == result


@pytest.mark.parametrize(
    ("doc", "error", "match"),
    [
        ({"format": "other"}, FileFormatError, "not a sequoia-acceptance/1"),
        ({"format": ACCEPTANCE_FORMAT, "vector": [0.5]}, FileFormatError, "'target'"),
        ({"format": ACCEPTANCE_FORMAT, "target": "t", "vector": [0.9, 0.3]}, AcceptanceError, "sums to"),
        ({"format": ACCEPTANCE_FORMAT, "target": "t", "vector": [-0.1]}, AcceptanceError, "#1"),
        ({"format": ACCEPTANCE_FORMAT, "target": "t", "vector": [0.1], "samples": "x"}, FileFormatError, "malformed"),
    ],
)
def test_bad_files(tmp_path, doc, error, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(error, match=match):
        AcceptanceResult.load(path)
