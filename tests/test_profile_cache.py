"""This device's cached profiles: the key, the quick grid's token range, reuse, and draft costs
priced only where they were measured."""

from __future__ import annotations

import numpy as np
import pytest

from sequoia import draft_costs as costs_
from sequoia import profile_cache as cache
from sequoia import profiler
from sequoia.device import KERNELS_VERSION, fingerprint, fingerprint_key
from sequoia.drafts import DraftSpec
from sequoia.errors import ConfigError
from sequoia.models import tiny_llama
from sequoia.profile import LatencyGrid, Profile
from sequoia.drafts.registry import trained_draft_dtype


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from word_tokenizer import word_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tiny_llama().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def test_the_cache_key_names_model_dtype_threads_and_device():
    fp = fingerprint("cpu")
    key = cache.profile_key(fp, "smollm2-135m", "bfloat16")
    assert key == f"smollm2-135m-bfloat16-{fp['threads']}t-{fingerprint_key(fp)}-k{KERNELS_VERSION}"
    assert cache.profile_path(fp, "smollm2-135m", "bfloat16") == cache.cache_dir() / "profiles" / f"{key}.json"
    others = [cache.profile_key(fp, "smollm2-135m", "float32"),
              cache.profile_key({**fp, "threads": fp["threads"] + 1}, "smollm2-135m", "bfloat16"),
              cache.profile_key({**fp, "aten_capability": "AVX2"}, "smollm2-135m", "bfloat16"),
              cache.profile_key(fp, "/models/a/model", "bfloat16"), cache.profile_key(fp, "/models/b/model", "bfloat16")]
    assert len({key, *others}) == 6
    assert cache.slug("/models/a/model").startswith("model-") and cache.slug("early-exit:8") == "early-exit-8"


def test_quick_grid_stops_growing_past_three_times_one_token(monkeypatch, tiny_target):
    latency = {1: 30, 2: 33, 3: 36, 4: 40, 6: 48, 8: 60, 12: 95, 16: 140, 24: 200}
    monkeypatch.setattr(profiler, "_tree_pass", lambda model, c, prefix, n, gen: n)
    monkeypatch.setattr(profiler, "time_pass", lambda run, model, c, prefix: float(latency[run]))
    assert cache.quick_tokens(tiny_target, 64) == (1, 2, 3, 4, 6, 8, 12)  # 95 ms > 3 x 30 ms
    assert cache.quick_prefixes(8192) == (128, 512) and cache.quick_prefixes(256) == (128,)
    assert cache.quick_prefixes(100) == (25,)


def test_rounds_that_ran_beside_other_work_are_measured_again(monkeypatch, tiny_target):
    """A burst of other work makes whole rounds many times slower; they are replaced, so the
    medians are the device's (here rounds 2 and 3 of the timed ones ran 40x slower)."""
    passes = iter(range(10_000))
    base = {1: 30.0, 4: 33.0}
    monkeypatch.setattr(profiler, "_tree_pass", lambda model, c, prefix, n, gen: n)

    def timed(run, model, c, prefix):
        k = next(passes)  # 2 cells per round, the warm-up round first
        return base[run] * (40.0 if k // 2 in (2, 3) else 1.0 + 0.01 * (k % 3))

    monkeypatch.setattr(profiler, "time_pass", timed)
    samples = cache.clean_rounds(tiny_target, [16], [1, 4], repeats=5)
    assert samples.shape == (1, 2, 5) and samples.max() < 31 * 1.1
    np.testing.assert_allclose(np.median(samples, axis=-1), [[30.3, 33.33]], rtol=0.02)


def test_profile_measured_once_then_reused_and_never_across_devices(tiny_dir):
    targets = cache.Targets(tiny_dir, "cpu")
    first = cache.device_profiles(tiny_dir, ["float32"], "cpu", targets)["float32"]
    assert first.measured and first.path.is_file() and first.profile.dtype == "float32"
    assert first.profile.fingerprint == fingerprint("cpu") and first.profile.target.prefix_lengths == (128,)
    again = cache.device_profiles(tiny_dir, ["float32"], "cpu", cache.Targets(tiny_dir, "cpu"))["float32"]
    assert not again.measured and again.path == first.path
    assert again.profile.target.tokens == first.profile.target.tokens
    # the same file under another device's fingerprint is not this device's profile
    other = {**fingerprint("cpu"), "cpu_model": "Other"}
    assert cache.read_cached(other, cache.model_name(tiny_dir), "float32") is None


def _write_profile(path, fp, model="tiny", dtype="float32", medians=(10.0, 10.5, 11.0, 12.0)):
    samples = np.repeat(np.asarray(medians, dtype=float)[None, :, None], 3, axis=2)
    Profile(LatencyGrid(model, (64,), (1, 2, 4, 8), samples), {"dtype": dtype, "fingerprint": fp}, {}).save(path)


def test_an_explicit_profile_of_another_device_is_refused_unless_forced(tmp_path):
    here = fingerprint("cpu")
    _write_profile(tmp_path / "mine.json", here)
    _write_profile(tmp_path / "theirs.json", {**here, "cpu_model": "Xeon", "isa_flags": ["amx_bf16"]})
    found = cache.device_profiles("tiny", ["float32"], explicit=[tmp_path / "mine.json"])
    assert list(found) == ["float32"] and not found["float32"].measured
    with pytest.raises(ConfigError) as refused:
        cache.device_profiles("tiny", [], explicit=[tmp_path / "theirs.json"])
    message = str(refused.value)
    assert "\n" not in message and "cpu_model: Xeon (recorded)" in message and "isa_flags: amx_bf16 (recorded)" in message
    warnings = []
    cache.device_profiles("tiny", [], explicit=[tmp_path / "theirs.json"], foreign_ok=True, warn=warnings.append)
    assert len(warnings) == 1 and "another device" in warnings[0]
    with pytest.raises(ConfigError, match="profiles 'tiny', not the target 'other'"):
        cache.device_profiles("other", [], explicit=[tmp_path / "mine.json"])


def test_a_cards_costs_count_only_on_the_device_that_measured_them(tiny_dir, tmp_path):
    from trained_draft_helpers import random_draft

    from sequoia.drafts.card import save_draft, update_card

    save_draft(random_draft("mlp", tiny_llama(seed=0), heads=2), tmp_path / "d", "tiny")
    run_dtype = trained_draft_dtype("cpu")
    update_card(tmp_path / "d", {"evaluation": {"cost_ms_per_level": {"0": 0.5, "1": 7.0, "16": 9.0},
                                                "cost_dtype": run_dtype, "cost_fingerprint": fingerprint("cpu")}})
    here_card = costs_.device_draft_costs(DraftSpec.resolve(tmp_path / "d", tiny_dir), tiny_dir, ["float32"])
    assert here_card["float32"] == costs_.DraftCosts({0: 0.5, 1: 7.0, 16: 9.0}, "card", run_dtype)
    # a card measured elsewhere (or before fingerprints, or without a cost per step) is timed
    # again here, then cached
    for evaluation in ({"cost_ms_per_level": {"0": 0.5, "1": 7.0, "16": 9.0}, "cost_dtype": run_dtype},
                       {"cost_ms_per_level": {"1": 7.0, "16": 9.0}, "cost_dtype": run_dtype,
                        "cost_fingerprint": fingerprint("cpu")}):
        update_card(tmp_path / "d", {"evaluation": evaluation})
        spec = DraftSpec.resolve(tmp_path / "d", tiny_dir)
        measured = costs_.device_draft_costs(spec, tiny_dir, ["float32", "bfloat16"])
        assert measured["float32"].source in ("measured", "cache") and measured["float32"] is measured["bfloat16"]
    assert sorted(measured["float32"].level_ms) == [0, *costs_.DRAFT_WIDTHS]
    assert costs_.device_draft_costs(spec, tiny_dir, ["float32"])["float32"].source == "cache"
    assert costs_.device_draft_costs(DraftSpec.resolve("ngram", tiny_dir), tiny_dir, ["float32"])["float32"].source == "free"


def test_an_early_exit_draft_is_timed_per_level_in_the_engines_dtype(tiny_dir):
    costs = costs_.device_draft_costs(DraftSpec.resolve("early-exit:1", tiny_dir), tiny_dir, ["float32"])["float32"]
    assert costs.source == "measured" and costs.dtype == "float32"
    assert sorted(costs.level_ms) == list(costs_.DRAFT_WIDTHS) and all(ms > 0 for ms in costs.level_ms.values())
