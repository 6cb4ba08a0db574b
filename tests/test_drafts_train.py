"""Training trained drafts: reduced vocabulary, features, loss, learning a learnable target,
checkpoint resume, the draft directory format, and bad input -> one-line typed errors."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from trained_draft_helpers import bigram_target, check_greedy_lossless, random_draft, sampled_sequences

from sequoia.drafts import DraftSpec
from sequoia.drafts.training import train as train_module
from sequoia.drafts.training.data import DataStore, Manifest
from sequoia.drafts.context_mix import ContextMix
from sequoia.drafts.training.evaluate import agreement, level_costs
from sequoia.drafts.training.features import FeatureCache, FeatureSet, extract_features
from sequoia.drafts.heads import HeadsProposer
from sequoia.drafts.ngram import NgramIndex
from sequoia.drafts.training.train import TrainSettings, draft_loss, open_training_data, train_draft
from sequoia.drafts.card import CARD, WEIGHTS, save_draft, update_card
from sequoia.optimizer import DraftLimits
from sequoia.drafts.trained import ReducedVocab
from sequoia.drafts.registry import load_draft
from sequoia.errors import ConfigError, FileFormatError, ModelError
from sequoia.models import LoadedModel, tiny_llama
from cli_helpers import assert_user_error

FAST = dict(heads=3, vocab=48, batch_tokens=512, lr=3e-3, precision="float32", minutes=None)


def loaded(model, name: str = "tiny") -> LoadedModel:
    return LoadedModel(model, None, name, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def bigram():
    return bigram_target()


@pytest.fixture(scope="module")
def features(bigram) -> tuple[FeatureSet, FeatureSet]:
    """Sampled training continuations and greedy held-out ones from other prompts."""
    train = extract_features(loaded(bigram), sampled_sequences(bigram, 64, 40, seed=0))
    held_out = extract_features(loaded(bigram), sampled_sequences(bigram, 16, 40, seed=1, greedy=True))
    return train, held_out


def test_reduced_vocabulary():
    vocab = ReducedVocab.most_frequent(np.array([5, 5, 2, 7, 7, 7]), 3, 10, always=(9,))
    assert vocab.ids.tolist() == [9, 7, 5] and vocab.index[7] == 1 and vocab.index[2] == -1
    full = vocab.to_full_probs(torch.tensor([[0.5, 0.25, 0.25]]))
    assert full.shape == (1, 10) and full[0, 9] == 0.5 and full[0, 5] == 0.25 and full.sum() == 1
    with pytest.raises(FileFormatError, match="distinct"):
        ReducedVocab(torch.tensor([1, 1]), 10)


def test_features_are_the_targets_own(tiny_target):
    seqs = [(np.array([3, 9, 27, 1, 5]), 2), (np.array([8, 8, 2]), 1)]
    feats = extract_features(loaded(tiny_target), seqs, max_tokens=4)  # one sequence per batch
    with torch.no_grad():
        out = tiny_target(torch.tensor([[3, 9, 27, 1, 5]]), output_hidden_states=True)
    assert feats.num_sequences == 2 and feats.generated_positions == 3 + 2
    assert torch.allclose(feats.hidden[:5].float(), out.hidden_states[-1][0], atol=2e-2)  # stored in bf16
    assert torch.allclose(feats.lse[:5], out.logits[0].logsumexp(-1), atol=1e-4)
    assert feats.top1[:5].tolist() == out.logits[0].argmax(-1).tolist()
    batch = feats.batch([0, 1])
    assert batch.tokens[1].tolist() == [8, 8, 2, -1, -1]
    # level 2 (0-based 1): roots from the last prompt token (i - 1 >= prompt_len - 1), label exists
    assert batch.mask(1, generated_only=True).int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]


@pytest.mark.parametrize("kind", ["mlp", "chimera"])
def test_training_lowers_the_loss(kind, bigram, features):
    train, _ = features
    model = random_draft(kind, bigram, reduced=48)
    model.init_output_from(bigram.lm_head.weight)
    teacher = bigram.lm_head.weight.detach()[model.vocab.ids]
    batch = train.random_batch(torch.Generator().manual_seed(0), 512)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(15):
        loss = draft_loss(model, batch, teacher, "output")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    assert float(draft_loss(model, batch, teacher, "input").detach()) > 0


@pytest.mark.parametrize("loss_rows", [7, 4096], ids=["chunked", "one-chunk"])
@pytest.mark.parametrize("kind", ["mlp", "chimera"])
def test_the_loss_is_the_definition(kind, loss_rows, bigram, features, monkeypatch):
    """Per level: cross-entropy from the target's distribution over the reduced vocabulary
    (output stage) or with the next token (input stage), over that level's positions --
    whatever the chunks of rows it is summed in."""
    monkeypatch.setattr(train_module, "LOSS_ROWS", loss_rows)
    train, _ = features
    model = random_draft(kind, bigram, reduced=48)
    teacher = bigram.lm_head.weight.detach()[model.vocab.ids]
    batch = train.random_batch(torch.Generator().manual_seed(1), 512)
    logits = model.unroll(batch.tokens, batch.hidden)
    p = ((batch.hidden.float() @ teacher.T) - batch.lse[..., None]).exp()
    following = model.vocab.index[torch.cat([batch.tokens[:, 1:], batch.tokens[:, :1]], 1).clamp(min=0)]
    output, inputs = [], []
    for level, z in enumerate(logits):
        logq = torch.log_softmax(z, -1)
        out_mask, in_mask = batch.mask(level, generated_only=True), batch.mask(level, generated_only=False)
        output.append(-(p * logq).sum(-1)[out_mask].mean())
        kept = following[in_mask] >= 0
        inputs.append(-logq[in_mask][kept].gather(1, following[in_mask][kept][:, None]).mean())
    with torch.no_grad():
        assert torch.allclose(draft_loss(model, batch, teacher, "output"), torch.stack(output).mean(), rtol=1e-5)
        assert torch.allclose(draft_loss(model, batch, teacher, "input"), torch.stack(inputs).mean(), rtol=1e-5)


@pytest.mark.parametrize("loss_rows", [7, 4096], ids=["chunked", "one-chunk"])
def test_the_loss_through_the_mix_is_the_definition(loss_rows, bigram, features, monkeypatch):
    """With mix weights, each node's cross-entropy is that of the mixed distribution the
    proposer would build there (lookup + mix over the text up to the root), over the reduced
    vocabulary; the weights get gradients."""
    monkeypatch.setattr(train_module, "LOSS_ROWS", loss_rows)
    train, _ = features
    model = random_draft("chimera", bigram, reduced=48)  # some followers fall outside
    teacher = bigram.lm_head.weight.detach()[model.vocab.ids]
    batch = train.random_batch(torch.Generator().manual_seed(2), 512)
    mix = ContextMix((0.3, 1.5, 0.7))
    logits = model.unroll(batch.tokens, batch.hidden)
    p = ((batch.hidden.float() @ teacher.T) - batch.lse[..., None]).exp()
    expected = []
    for level, z in enumerate(logits):
        losses = []
        for b, i in batch.mask(level, generated_only=True).nonzero().tolist():
            text = batch.tokens[b].tolist()
            index = NgramIndex(3)
            index.extend(text[: i - level + 1])
            part = mix.lookup(index, tuple(text[max(0, i - 2) : i + 1]))
            mixed, _ = mix.mix(z[b, i].softmax(-1)[None], [part], model.vocab.rows, model.vocab.ids)
            losses.append(-(p[b, i] * mixed[0, : model.vocab.size].log()).sum())
        expected.append(torch.stack(losses).mean())
    weights = torch.tensor(mix.weights, requires_grad=True)
    loss = draft_loss(model, batch, teacher, "output", weights)
    assert torch.allclose(loss, torch.stack(expected).mean(), rtol=1e-5)
    loss.backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0
    plain = draft_loss(model, batch, teacher, "output")
    assert not torch.allclose(loss, plain)  # the batch repeats itself: the mix matters


def straight_and_resumed(settings: TrainSettings, features, target, tmp_path, crash_at: int):
    """``(model, report)`` of a run straight through (in ``tmp_path / "a"``) and of the same run
    interrupted at step ``crash_at`` and resumed from its last checkpoint (``tmp_path / "b"``);
    asserts the two models are bit-identical."""
    train, held_out = features
    straight = train_draft(settings, train, held_out, target, tmp_path / "a")

    def crash(done, total, label):
        if f"step {crash_at} " in label:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_draft(settings, train, held_out, target, tmp_path / "b", progress=crash)
    resumed = train_draft(settings, train, held_out, target, tmp_path / "b")
    for a, b in zip(straight[0].state_dict().values(), resumed[0].state_dict().values()):
        assert torch.equal(a, b)
    return straight, resumed


def test_a_mix_loss_run_learns_weights_and_resumes(bigram, features, tmp_path):
    train, held_out = features
    settings = TrainSettings(kind="chimera", steps=6, checkpoint_every=3, context_mix=3, mix_loss=True, **FAST)
    (straight, report), (_, again) = straight_and_resumed(settings, features, bigram, tmp_path, crash_at=5)
    assert report.learned_mix is not None and report.learned_mix.max_ngram == 3
    assert report.learned_mix != ContextMix((train_module.MIX_INIT,) * 3)  # the weights moved
    assert again.learned_mix == report.learned_mix and again.agreement == report.agreement
    assert report.agreement == agreement(straight, held_out, mix=report.learned_mix)  # scored through the mix
    with pytest.raises(ConfigError, match="--context-mix 3"):  # resumed with a mix of another length
        train_draft(TrainSettings(**{**asdict(settings), "context_mix": 2}), train, held_out, bigram, tmp_path / "b")
    with pytest.raises(ConfigError, match="--mix-loss"):
        TrainSettings(kind="chimera", mix_loss=True, context_mix=0)


@pytest.mark.parametrize("kind, steps", [("mlp", 300), ("chimera", 250)])
def test_a_learnable_target_is_learned(kind, steps, bigram, features, tmp_path):
    train, held_out = features
    settings = TrainSettings(kind=kind, steps=steps, **FAST)
    model, report = train_draft(settings, train, held_out, bigram, tmp_path)
    assert report.steps == steps and (tmp_path / "checkpoint.pt").is_file()
    assert [a.level for a in report.agreement] == [1, 2, 3]
    assert report.agreement[0].top1 > 0.85 and all(a.top4 > 0.9 for a in report.agreement), report.agreement
    assert agreement(model, held_out) == report.agreement  # the report is the model's
    check_greedy_lossless(model, bigram, [1, 5, 9])


def test_resume_continues_the_same_run(bigram, features, tmp_path):
    train, held_out = features
    settings = TrainSettings(kind="mlp", steps=20, checkpoint_every=10, **FAST)
    _, (_, report) = straight_and_resumed(settings, features, bigram, tmp_path, crash_at=15)
    assert report.steps == 20
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    del saved["settings"]["mix_loss"]  # a checkpoint from before that setting existed
    torch.save(saved, tmp_path / "b" / "checkpoint.pt")
    assert train_draft(settings, train, held_out, bigram, tmp_path / "b")[1].steps == 20
    with pytest.raises(ConfigError, match="heads"):
        train_draft(TrainSettings(kind="mlp", steps=20, **{**FAST, "heads": 2}), train, held_out, bigram, tmp_path / "b")
    (tmp_path / "b" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(FileFormatError, match="corrupt"):
        train_draft(settings, train, held_out, bigram, tmp_path / "b")


def test_a_run_in_chunks_is_the_run_straight_through(bigram, features, tmp_path):
    """--chunk-minutes: each run stops after its chunk (here: one step) with the budget left
    for the next, which resumes the same schedule; four chunks give the straight run's draft."""
    train, held_out = features
    settings = TrainSettings(kind="chimera", steps=4, checkpoint_every=50, eval_every=50, **FAST)
    straight, report = train_draft(settings, train, held_out, bigram, tmp_path / "a")
    chunked = TrainSettings(**{**asdict(settings), "chunk_minutes": 1e-9})
    used = []
    for _ in range(4):
        model, part = train_draft(chunked, train, held_out, bigram, tmp_path / "b")
        used.append((part.steps, part.budget_used))
    assert used == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)] and report.budget_used == 1.0
    assert len(part.curve) == 4  # every chunk is evaluated as it ends
    for a, b in zip(straight.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="--chunk-minutes"):
        TrainSettings(kind="mlp", chunk_minutes=0)


def test_saved_draft_loads_and_decodes(tiny_target, tmp_path):
    model = random_draft("chimera", tiny_target)
    save_draft(model, tmp_path / "d", "tiny", {"training": {"steps": 1}})
    back = load_draft(tmp_path / "d", tiny_target)
    assert back.kind == "chimera" and back.config == model.config and torch.equal(back.vocab.ids, model.vocab.ids)
    for a, b in zip(model.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16).float(), b)  # shipped in bfloat16
    proposer = DraftSpec.resolve(tmp_path / "d", "tiny").proposer(loaded(tiny_target))
    assert isinstance(proposer, HeadsProposer) and proposer.model.out.weight.dtype == torch.bfloat16
    check_greedy_lossless(proposer.model, tiny_target, [1, 5, 9, 3, 7])
    timed = back.proposer()
    costs = level_costs(timed, widths=(1, 4), prefix=16, repeats=2)
    assert set(costs) == {0, 1, 4} and costs[1] >= 0 and costs[4] >= 0
    assert costs[0] + costs[1] > 0  # a one-level step costs something, whatever the first level saves
    assert set(level_costs(timed, widths=(2,), prefix=8, repeats=1)) == {0, 2}  # again, on a shorter context


@pytest.mark.parametrize(
    "other, words", [(dict(vocab_size=80), "80 tokens"), (dict(hidden_size=48), "width 48")], ids=["vocab", "width"]
)
def test_a_draft_for_another_target_is_refused(tiny_target, tmp_path, other, words):
    save_draft(random_draft("mlp", tiny_target), tmp_path / "d", "tiny")
    with pytest.raises(ModelError, match=words) as info:
        DraftSpec.resolve(tmp_path / "d", "tiny").proposer(loaded(tiny_llama(**other)))
    assert "\n" not in str(info.value) and "sequoia draft train" in str(info.value)


def test_corrupt_or_missing_drafts(tiny_target, tmp_path):
    with pytest.raises(FileFormatError, match="no trained draft"):
        load_draft(tmp_path / "missing")
    save_draft(random_draft("mlp", tiny_target), tmp_path / "d", "tiny")
    (tmp_path / "d" / WEIGHTS).write_bytes(b"\x00" * 64)
    with pytest.raises(FileFormatError, match="corrupt"):
        load_draft(tmp_path / "d", tiny_target)
    (tmp_path / "d" / CARD).write_text("{not json")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        load_draft(tmp_path / "d")
    (tmp_path / "d" / CARD).write_text('{"format": "sequoia-draft/1", "kind": "lstm"}')
    with pytest.raises(FileFormatError, match="unknown draft kind"):
        load_draft(tmp_path / "d")


def test_empty_store_and_store_of_another_target(tiny_target, tmp_path):
    settings = Manifest(target="tiny", dtype="float32", temperature=1.0, top_p=1.0, max_new_tokens=8)
    DataStore.open_or_create(tmp_path / "s", settings)
    with pytest.raises(ConfigError, match="empty"):
        open_training_data([tmp_path / "s"])
    with pytest.raises(FileFormatError, match="sequoia draft data"):
        open_training_data([tmp_path / "nothing"])
    with pytest.raises(ConfigError, match="at least one"):
        open_training_data([])
    store = DataStore.open(tmp_path / "s")
    store.append([np.arange(1, 9)], [3], seconds=1.0, prompts=1)
    cache = FeatureCache(tmp_path / "work", loaded(tiny_target))
    assert cache.train([store]).generated_positions == 5
    assert cache.train([store]).generated_positions == 5  # read back from the cache
    with pytest.raises(ConfigError, match="sampled from tiny"):
        FeatureCache(tmp_path / "work2", loaded(tiny_target, "other")).train([store])
    with pytest.raises(ConfigError, match="another target"):
        FeatureCache(tmp_path / "work", loaded(tiny_llama(hidden_size=48), "tiny"))
    with pytest.raises(ConfigError, match="budget"):
        TrainSettings(minutes=None)


def test_stores_are_pooled_and_cached_apart(tiny_target, tmp_path):
    sampled = Manifest(target="tiny", dtype="float32", temperature=1.0, top_p=1.0, max_new_tokens=8)
    greedy = Manifest(target="tiny", dtype="float32", temperature=0.0, top_p=1.0, max_new_tokens=8)
    a = DataStore.open_or_create(tmp_path / "a", sampled)
    a.append([np.arange(1, 9)], [3], seconds=1.0, prompts=1)
    b = DataStore.open_or_create(tmp_path / "b", greedy)
    b.append([np.arange(2, 8), np.arange(3, 12)], [2, 4], seconds=1.0, prompts=2)
    cache = FeatureCache(tmp_path / "work", loaded(tiny_target))
    pooled = cache.train(open_training_data([tmp_path / "a", tmp_path / "b"]))
    assert pooled.num_sequences == 3 and pooled.generated_positions == 5 + 4 + 5
    assert pooled.tokens[8:14].tolist() == list(range(2, 8))  # b's first sequence follows a's
    assert torch.equal(pooled.hidden, cache.train([a, b]).hidden)  # read back from the cache
    clash = DataStore.open_or_create(tmp_path / "elsewhere" / "a", greedy)
    clash.append([np.arange(1, 5)], [1], seconds=1.0, prompts=1)
    with pytest.raises(ConfigError, match="another data store named 'a'"):
        cache.train([clash])


@pytest.mark.parametrize(
    "case", ["missing draft", "corrupt draft", "empty store", "unknown kind", "mix without data", "mix of no draft", "mix ngram 0"]
)
def test_cli_bad_input_is_one_line(case, tiny_target, tmp_path):
    from typer.testing import CliRunner

    from sequoia_cli.main import app

    save_draft(random_draft("mlp", tiny_target), tmp_path / "d", "tiny")
    (tmp_path / "d" / WEIGHTS).write_bytes(b"junk")
    settings = Manifest(target="tiny", dtype="float32", temperature=1.0, top_p=1.0, max_new_tokens=8)
    DataStore.open_or_create(tmp_path / "s", settings)
    args, words = {
        "missing draft": (["eval", str(tmp_path / "nothing")], "not a trained draft"),
        "corrupt draft": (["eval", str(tmp_path / "d")], "corrupt"),
        "empty store": (["train", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "o")], "empty"),
        "unknown kind": (["train", "--kind", "rnn", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "o")], "rnn"),
        "mix without data": (["mix", str(tmp_path / "d")], "--data"),
        "mix of no draft": (["mix", str(tmp_path / "nothing"), "--data", str(tmp_path / "s")], "not a trained draft"),
        "mix ngram 0": (["mix", str(tmp_path / "d"), "--max-ngram", "0", "--data", str(tmp_path / "s")], "--max-ngram"),
    }[case]
    assert_user_error(CliRunner().invoke(app, ["draft", *args]), words, tmp_path / "o")


def test_draft_limits_come_from_the_card(tiny_target, tmp_path):
    save_draft(random_draft("mlp", tiny_target, heads=3), tmp_path / "d", "tiny")
    assert DraftSpec.resolve(tmp_path / "d", "tiny").limits == DraftLimits(3, {})  # not evaluated yet: cost unknown
    update_card(tmp_path / "d", {"evaluation": {"cost_ms_per_level": {"1": 1.25, "16": 1.8}}})
    # the card's cost is priced per device (tests/test_profile_cache.py), never carried as a limit
    assert DraftSpec.resolve(tmp_path / "d", "tiny").limits == DraftLimits(3, {})
    assert DraftSpec.resolve("ngram", "tiny").limits == DraftSpec.resolve("early-exit:4", "tiny").limits == DraftLimits()
    update_card(tmp_path / "d", {"evaluation": {"cost_ms_per_level": {"one": "fast"}}})
    with pytest.raises(FileFormatError, match="cost_ms_per_level"):
        DraftSpec.resolve(tmp_path / "d", "tiny")


def test_the_default_draft_is_the_packaged_one_when_it_ships(monkeypatch):
    import sequoia.drafts.registry as registry

    assert DraftSpec.resolve("early-exit:4", "smollm2-135m").name == "early-exit:4"
    assert DraftSpec.resolve(None, "some/other-model").name == "ngram"
    monkeypatch.setattr(registry, "packaged_drafts", lambda: [])
    assert DraftSpec.resolve(None, "smollm2-135m").name == "ngram"
    monkeypatch.setattr(registry, "packaged_drafts", lambda: ["smollm2-135m-chimera", "smollm2-135m-mlp"])
    spec = DraftSpec.resolve(None, "smollm2-135m")
    assert (spec.name, spec.kind, spec.limits.max_depth) == ("smollm2-135m-chimera", "trained", 4)


def test_the_training_curve_figure_draws_runs_of_any_depth():
    from sequoia.figures import training_curve_png

    curve = [{"minutes": 5.0, "top1": [0.5, 0.4, 0.3, 0.3]}, {"minutes": 10.0, "top1": [0.55, 0.45, 0.35, 0.3]}]
    deep = [{"minutes": 3.0, "top1": [0.56] * 8}]
    png = training_curve_png({"fresh": (0.0, curve), "fine-tuned": (10.0, deep)})
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
