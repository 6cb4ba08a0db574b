"""The self-distillation data store: shards, resume, settings checks, bad stores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import LogitsProcessorList
from word_tokenizer import word_tokenizer

from sequoia.drafts.training.data import DataStore, DrawNextToken, Manifest, generate_data, training_prompts
from sequoia.errors import ConfigError, FileFormatError
from sequoia.models import LoadedModel, tiny_llama
from sequoia.prompts import load_prompts
from sequoia.sampling import SamplingConfig, logits_to_probs

SETTINGS = dict(target="tiny", dtype="float32", temperature=1.0, top_p=0.95, max_new_tokens=8)


def test_training_prompts_are_many_deterministic_and_held_out():
    prompts = training_prompts(0)
    assert len(prompts) > 3000 and len(set(prompts)) > 0.99 * len(prompts)
    assert prompts == training_prompts(0) and prompts != training_prompts(1)
    assert not {p.text for p in load_prompts()} & set(prompts)


def test_append_read_and_resume(tmp_path):
    store = DataStore.open_or_create(tmp_path / "s", Manifest(**SETTINGS))
    store.append([np.array([1, 2, 3, 4]), np.array([5, 6])], [2, 1], seconds=1.5, prompts=2)
    store.append([np.array([7, 8, 9])], [1], seconds=0.5, prompts=1)
    reopened = DataStore.open_or_create(tmp_path / "s", Manifest(**SETTINGS))
    m = reopened.manifest
    assert (m.prompts_done, m.sequences, m.positions, m.seconds) == (3, 3, 2 + 1 + 2, 2.0)
    got = [(s.tolist(), p) for s, p in reopened.sequences()]
    assert got == [([1, 2, 3, 4], 2), ([5, 6], 1), ([7, 8, 9], 1)]
    assert not list((tmp_path / "s").glob(".*tmp*"))


def test_bad_stores(tmp_path):
    with pytest.raises(FileFormatError, match="sequoia draft data"):
        DataStore.open(tmp_path / "missing")
    store = DataStore.open_or_create(tmp_path / "s", Manifest(**SETTINGS))
    with pytest.raises(ConfigError, match="empty"):
        list(store.sequences())
    with pytest.raises(ConfigError, match="temperature"):
        DataStore.open_or_create(tmp_path / "s", Manifest(**{**SETTINGS, "temperature": 0.5}))
    store.append([np.array([1, 2])], [1], seconds=1.0, prompts=1)
    (tmp_path / "s" / store.manifest.shards[0]).write_bytes(b"not a zip")
    with pytest.raises(FileFormatError, match="corrupt"):
        list(store.sequences())


def test_drawn_tokens_follow_the_top_p_distribution_and_generate_emits_them():
    scores = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]]).repeat(20_000, 1)
    sampling = SamplingConfig(0.8, top_p=0.9)
    out = DrawNextToken(sampling, seed=0)(torch.zeros(20_000, 1, dtype=torch.long), scores)
    assert bool((torch.isfinite(out).sum(-1) == 1).all())
    counts = np.bincount(out.argmax(-1).numpy(), minlength=6)
    expected = logits_to_probs(scores[0], sampling).double().numpy()
    expected *= 20_000 / expected.sum()
    kept = expected > 0
    assert counts[~kept].sum() == 0  # top-p dropped them
    assert stats.chisquare(counts[kept], expected[kept]).pvalue > 1e-4
    model = tiny_llama(seed=0)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    runs = [model.generate(prompt, do_sample=False, max_new_tokens=12, pad_token_id=0,
                           logits_processor=LogitsProcessorList([DrawNextToken(SamplingConfig(1.0), seed)]))
            for seed in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])  # seeded draws, not argmax


def test_generate_data_grows_resumes_and_stores_prompt_plus_continuation(tmp_path):
    loaded = LoadedModel(tiny_llama(seed=0), word_tokenizer(), "tiny", torch.float32, torch.device("cpu"))
    settings = Manifest(target="tiny", dtype="float32", temperature=1.0, top_p=0.9, max_new_tokens=6, chat=False)
    store = DataStore.open_or_create(tmp_path / "s", settings)
    generate_data(store, loaded, positions=20, batch_size=3)
    first = DataStore.open(tmp_path / "s").manifest
    assert first.positions >= 20 and first.prompts_done == first.sequences == 3 * len(first.shards)
    generate_data(DataStore.open(tmp_path / "s"), loaded, positions=40, batch_size=3)  # resumes, appends
    stored = list(DataStore.open(tmp_path / "s").sequences())
    assert DataStore.open(tmp_path / "s").manifest.positions == sum(len(t) - p for t, p in stored) >= 40
    prompts = training_prompts(0)
    for i, (tokens, plen) in enumerate(stored):
        assert tokens[:plen].tolist() == loaded.tokenizer(prompts[i])["input_ids"]
        assert 1 <= len(tokens) - plen <= 6
    again = tmp_path / "again"
    generate_data(DataStore.open_or_create(again, settings), loaded, positions=20, batch_size=3)
    replay = [t.tolist() for t, _ in DataStore.open(again).sequences()]
    assert replay == [t.tolist() for t, _ in stored[: len(replay)]]  # a store's samples follow from its seeds
