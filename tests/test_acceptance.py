"""The acceptance file format and (once an engine exists) the measurement."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sequoia.acceptance import ACCEPTANCE_FORMAT, AcceptanceResult, measure_counts, measure_counts_by_depth
from sequoia.drafts.lm import LMProposer
from sequoia.sampling import SamplingConfig
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


def test_rows_by_depth_round_trip(tmp_path):
    counts, samples = np.array([[50, 20], [12, 6], [1, 0]]), np.array([100, 40, 5])
    result = AcceptanceResult.from_depth_counts(counts, samples, **FIELDS)
    assert result.vector == (0.5, 0.2) and result.samples == 100
    assert result.by_depth == ((0.5, 0.2), (0.3, 0.15))  # depth 3 (5 positions) is too thin to keep
    assert result.depth_samples == (100, 40, 5)
    assert result.for_solver.tolist() == [[0.5, 0.2], [0.3, 0.15]]
    result.save(tmp_path / "acc.json")
    assert AcceptanceResult.load(tmp_path / "acc.json") == result
    one = AcceptanceResult.from_depth_counts(counts[:1], samples[:1], **FIELDS)
    assert one.by_depth == () and one.for_solver.tolist() == [0.5, 0.2]  # one depth: the vector


@pytest.mark.parametrize(
    ("doc", "error", "match"),
    [
        ({"format": "other"}, FileFormatError, "not a sequoia-acceptance/1"),
        ({"format": ACCEPTANCE_FORMAT, "vector": [0.5]}, FileFormatError, "'target'"),
        ({"format": ACCEPTANCE_FORMAT, "target": "t", "vector": [0.9, 0.3]}, AcceptanceError, "sums to"),
        ({"format": ACCEPTANCE_FORMAT, "target": "t", "vector": [-0.1]}, AcceptanceError, "#1"),
        ({"format": ACCEPTANCE_FORMAT, "target": "t", "vector": [0.1], "samples": "x"}, FileFormatError, "malformed"),
        ({"format": ACCEPTANCE_FORMAT, "target": "t", "vector": [0.5], "by_depth": [[0.5], [1.2]]}, AcceptanceError, "depth 2"),
        ({"format": ACCEPTANCE_FORMAT, "target": "t", "vector": [0.5], "by_depth": [[0.5, 0.1]]}, AcceptanceError, "entries"),
        ({"format": ACCEPTANCE_FORMAT, "target": "t", "vector": [0.5], "by_depth": [0.5, 0.1]}, AcceptanceError, "rows"),
    ],
)
def test_bad_files(tmp_path, doc, error, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(error, match=match):
        AcceptanceResult.load(path)


# ---------------------------------------------------------------------- measurement
PROMPTS = [torch.tensor([3, 1, 4, 1, 5]), torch.tensor([9, 2, 6])]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_draft_equal_to_the_target_is_always_accepted_at_every_depth(tiny_target, temperature):
    counts, samples = measure_counts_by_depth(
        tiny_target, LMProposer(tiny_target), PROMPTS, 3, SamplingConfig(temperature), depth=3, max_new_tokens=12
    )
    assert counts.shape == (3, 3) and np.all(samples > 0)
    assert counts[:, 0].tolist() == samples.tolist() and counts[:, 1:].sum() == 0


def test_depths_are_counted_only_below_an_accepted_spine(tiny_target, tiny_draft):
    counts, samples = measure_counts_by_depth(
        tiny_target, LMProposer(tiny_draft), PROMPTS, 4, SamplingConfig(), depth=3, max_new_tokens=24
    )
    assert np.all(counts.sum(axis=1) <= samples) and samples[0] >= samples[1] >= samples[2]
    # depth k + 1 is sampled when depth k accepted its rank-0 (spine) candidate, unless the
    # tree was cut at a length limit (the last steps of a prompt)
    cut = counts[:-1, 0] - samples[1:]
    assert np.all(cut >= 0) and cut.sum() <= len(PROMPTS) * 2
    star, star_samples = measure_counts(tiny_target, LMProposer(tiny_draft), PROMPTS, 4, SamplingConfig(), 24)
    assert star.sum() <= star_samples and star.shape == (4,)
