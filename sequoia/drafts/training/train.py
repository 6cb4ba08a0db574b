"""Training a draft on the target's own features: losses, stages, checkpoints, time budget.

Every step draws random sequences from the cached features (:mod:`sequoia.drafts.training.features`),
unrolls all the draft's levels teacher-forced (:meth:`TrainedDraft.unroll`) and sums one loss
per level over the reduced vocabulary:

* ``input`` stage (the IBM paper's first stage, MLP speculator only): cross-entropy with the
  next token of the text the target reads, prompts included;
* ``output`` stage: distillation, ``-sum_t p(t) log q(t)`` with ``p`` the target's full
  distribution (from its stored hidden state and log-sum-exp) restricted to the reduced
  vocabulary, at the positions decoding meets (roots from the last prompt token on).
  With ``mix_loss`` the same cross-entropy is taken of the draft *through its context mix*,
  ``q' = (q + sum_n w_n P_n) / (1 + sum_n w_n)`` (:mod:`sequoia.drafts.context_mix`, the n-grams
  found as decoding would, teacher-forced), with the log-weights learned alongside: the draft
  need not spend its capacity on what the context already supplies.

A run is bounded by ``steps`` or ``minutes`` (of training, evaluations and checkpoints, summed
over resumed runs; the one-off target pass that caches features is not counted), whichever
comes first; the learning rate warms up, then follows a cosine over that budget. A budget
longer than one sitting is trained in chunks: ``chunk_minutes`` ends this run (evaluated,
checkpointed, the draft written as it stands) and the same command later resumes the
schedule. Batches are drawn from a generator seeded by ``(seed, step)``, so a resumed run
continues the same stream.
The checkpoint (model, optimiser, step, elapsed time) is written atomically to the work
directory every ``checkpoint_every`` steps and at the end.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sequoia.drafts.training.data import DataStore
from sequoia.drafts.context_mix import CARD_KEY, MAX_NGRAM, ContextMix, batch_terms
from sequoia.drafts.training.evaluate import (
    LevelAgreement,
    agreement,
    evaluate_draft,
    evaluation_record,
    fit_context_mix,
    level_costs,
)
from sequoia.drafts.training.features import FeatureBatch, FeatureCache, FeatureSet
from sequoia.drafts.trained import ReducedVocab, TrainedDraft
from sequoia.drafts.card import draft_dir, read_card, save_draft, update_card
from sequoia.drafts.registry import draft_kinds, load_draft, load_trained_proposer
from sequoia.errors import ConfigError, FileFormatError
from sequoia.models import LoadedModel, dtype_name
from sequoia.files import write_atomic

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "sequoia-draft-checkpoint/1"
# Rows per output-layer chunk of the loss: its float32 buffers stay under 32 MB, which glibc
# reuses from its heap; larger ones it maps afresh each step, and the page faults cost ~20% of a CPU step.
LOSS_ROWS = 192
MIX_SEQUENCES = 256  # training sequences the context mix is fitted on
WARMUP_STEPS = 50
MIX_INIT = 0.3  # initial context-mix weight w_n of a --mix-loss run
MIX_LR_SCALE = 10.0  # its log-weights' learning rate relative to the draft's (a few numbers that move far)
FINAL_LR_SHARE = 0.1
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TrainSettings:
    """What a training run does; the fields above ``steps`` fix the run (a resume must match)."""

    kind: str = "mlp"
    heads: int = 4  # tree levels = maximum tree depth (unless recurrent)
    recurrent: bool = False  # chimera: the last head serves every deeper level (any tree depth)
    levels: int = 0  # levels unrolled and scored per step; 0: heads (more: a recurrent draft's deeper levels)
    init_from: str = ""  # start from this saved draft's weights and vocabulary (fine-tuning)
    vocab: int = 8192  # reduced output vocabulary
    batch_tokens: int = 2048  # padded tokens per step
    lr: float = 1e-3
    input_stage: float = 0.3  # mlp: share of the budget on the target's input behaviour
    attention_heads: int = 0  # chimera: 0 = hidden // 64
    precision: str = "bfloat16"  # autocast dtype of the forward: bfloat16 | float32
    mix_loss: bool = False  # train through the context mix (n-grams up to context_mix), learning its weights
    seed: int = 0
    steps: int | None = None
    minutes: float | None = 60.0
    chunk_minutes: float | None = None  # stop this run after this long; the next run resumes the budget
    eval_every: int = 50
    checkpoint_every: int = 50
    context_mix: int = MAX_NGRAM  # longest suffix of the context mix fitted after training; 0: none

    def __post_init__(self) -> None:
        kinds = ("mlp", "chimera")
        if self.kind not in kinds:
            raise ConfigError(f"unknown draft kind {self.kind!r}; choose one of {', '.join(kinds)}")
        if self.steps is None and self.minutes is None:
            raise ConfigError("give a budget: --steps, --minutes or both")
        if min(self.heads, self.vocab, self.batch_tokens, self.eval_every, self.checkpoint_every) < 1:
            raise ConfigError("--heads, --vocab, --batch-tokens and the intervals must be at least 1")
        if self.context_mix < 0:
            raise ConfigError(f"--context-mix must be 0 (none) or a suffix length, got {self.context_mix}")
        if (self.steps is not None and self.steps < 1) or any(m is not None and m <= 0 for m in (self.minutes, self.chunk_minutes)):
            raise ConfigError("--steps, --minutes and --chunk-minutes must be positive")
        if self.mix_loss and not self.context_mix:
            raise ConfigError("--mix-loss trains through the context mix; give --context-mix a suffix length")
        if self.levels and self.levels != self.heads and not self.recurrent:
            raise ConfigError(f"--levels {self.levels} needs --recurrent (a draft without it has one head per level)")
        if self.recurrent and self.kind != "chimera":
            raise ConfigError("--recurrent is for --kind chimera (it reuses the last residual head)")
        if self.precision not in ("bfloat16", "float32"):
            raise ConfigError(f"--precision must be bfloat16 or float32, got {self.precision!r}")

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint."""
        names = [f.name for f in fields(self)]
        return {k: v for k, v in asdict(self).items() if names.index(k) < names.index("steps")}


@dataclass(frozen=True)
class TrainReport:
    steps: int
    seconds: float  # training time (evaluations and checkpoints included), summed over resumes
    loss: float  # smoothed loss at the end
    agreement: list[LevelAgreement]  # held-out, per level (through the learned mix of a --mix-loss run)
    learned_mix: ContextMix | None = None  # the weights a --mix-loss run learned
    curve: tuple[dict[str, Any], ...] = ()  # each held-out evaluation: step, minutes, top-1 per level
    budget_used: float = 1.0  # below 1: a chunk ended the run, the same command resumes it


def build_draft(settings: TrainSettings, target, vocab: ReducedVocab) -> TrainedDraft:
    """A fresh draft for ``target`` (a ``PreTrainedModel``): output layer from the target's rows."""
    embedding = target.get_input_embeddings().weight
    cls = draft_kinds()[settings.kind]
    extra = {"attention_heads": settings.attention_heads} if settings.kind == "chimera" else {}
    torch.manual_seed(settings.seed)
    config = cls.config_class(int(embedding.shape[1]), int(embedding.shape[0]), settings.heads, settings.recurrent, **extra)
    model = cls(config, vocab)
    model.attach_target(embedding)
    model.init_output_from(target.get_output_embeddings().weight)
    if settings.init_from:
        start = load_draft(settings.init_from, target)
        if start.kind != settings.kind or start.config.heads != settings.heads or not torch.equal(start.vocab.ids, vocab.ids):
            raise ConfigError(f"--init-from {settings.init_from} is not a {settings.kind} draft with {settings.heads} heads and this vocabulary")
        model.load_state_dict(start.state_dict())
    return model


def draft_loss(
    model: TrainedDraft,
    batch: FeatureBatch,
    teacher: torch.Tensor,
    stage: str,
    mix_weights: torch.Tensor | None = None,
    levels: int | None = None,
) -> torch.Tensor:  # [] mean over levels of the per-level mean loss
    """The loss of one batch (see the module docstring); ``teacher``: [r, hidden] the target's
    output rows for the reduced vocabulary. With ``mix_weights`` (the context mix's ``w_n``)
    the output stage scores the mixed distribution ``q'`` instead of ``q``."""
    assert teacher.ndim == 2 and stage in ("input", "output")
    states = model.unroll_states(batch.tokens, batch.hidden, levels)
    generated = stage == "output"
    # Every level's positions lie within level 0's: all levels are scored on level 0's rows, in
    # one output product per chunk of rows, and each level's loss weighs in only its own rows.
    # The output layer and the softmax over the reduced vocabulary dominate a step.
    rows = batch.mask(0, generated_only=generated)  # [B, T]
    nodes = torch.stack([batch.mask(level, generated) for level in range(len(states))])  # [L, B, T]
    weights = nodes[:, rows].float()  # [L, m]
    terms = None
    if mix_weights is not None and generated:
        terms = batch_terms(batch.tokens, nodes, rows, model.vocab.rows, len(mix_weights))
        log_mass, log_norm = terms.log_masses(mix_weights)
    inputs = torch.stack([state[rows] for state in states])  # [L, m, hidden]
    if generated:
        hidden, lse = batch.hidden[rows], batch.lse[rows]
    else:
        following = torch.cat([batch.tokens[:, 1:], batch.tokens[:, :1]], dim=1).clamp(min=0)
        target = model.vocab.index.to(following.device)[following[rows]]  # [m] row or -1
        weights = weights * (target >= 0)
    total = weights.new_zeros(len(states))
    for chunk in torch.arange(weights.shape[1], device=weights.device).split(LOSS_ROWS):
        log_q = F.log_softmax(model.out(inputs[:, chunk]).float(), dim=-1)  # [L, c, r]
        if generated:
            p = ((hidden[chunk].to(teacher) @ teacher.T).float() - lse[chunk][:, None]).exp()  # [c, r]
            cross = -torch.linalg.vecdot(p, log_q)  # [L, c]
            if terms is not None:
                cross = cross + terms.cross_entropy_shift(log_q, p, int(chunk[0]), log_mass, log_norm)
        else:
            cross = -log_q.gather(-1, target[chunk].clamp(min=0)[None, :, None].expand(len(states), -1, 1)).squeeze(-1)
        total = total + (cross * weights[:, chunk]).sum(-1)
    return (total / weights.sum(-1).clamp(min=1)).mean()


def train_draft(
    settings: TrainSettings,
    train: FeatureSet,
    held_out: FeatureSet,
    target,
    work: str | os.PathLike,
    device: str | torch.device = "cpu",
    eos_token_ids: Sequence[int] = (),
    progress: Progress | None = None,
) -> tuple[TrainedDraft, TrainReport]:
    """Train (or resume training) a draft for ``target``; returns it in eval mode."""
    path = Path(work) / CHECKPOINT
    saved = _load_checkpoint(path, settings) if path.is_file() else None
    full = int(target.get_input_embeddings().weight.shape[0])
    if saved is None and settings.init_from:
        vocab = load_draft(settings.init_from, target).vocab
    elif saved is None:
        vocab = ReducedVocab.most_frequent(train.generated_tokens(), settings.vocab, full, tuple(eos_token_ids))
    else:
        vocab = ReducedVocab(torch.tensor(saved["vocab_ids"], dtype=torch.long), full)
    model = build_draft(settings, target, vocab).to(device)
    model.attach_target(target.get_input_embeddings().weight.to(device))
    groups = [{"params": list(model.parameters()), "lr_scale": 1.0}]
    log_mix = None
    if settings.mix_loss:
        log_mix = torch.full((settings.context_mix,), math.log(MIX_INIT), device=device, requires_grad=True)
        learned = _init_mix(settings)
        if learned is not None and len(learned.weights) == settings.context_mix:
            log_mix.data.copy_(torch.tensor(learned.weights).log())
        groups.append({"params": [log_mix], "lr_scale": MIX_LR_SCALE})
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, seconds, loss_avg, curve = 0, 0.0, math.nan, []
    if saved is not None:
        model.load_state_dict(saved["model"])
        if log_mix is not None:
            if saved["log_mix"].shape != log_mix.shape:
                raise ConfigError(
                    f"{path} learned a context mix of {len(saved['log_mix'])} suffix lengths; pass --context-mix "
                    f"{len(saved['log_mix'])}, --fresh to start over, or another --work directory"
                )
            log_mix.data.copy_(saved["log_mix"])
        optimizer.load_state_dict(saved["optimizer"])
        step, seconds, loss_avg = int(saved["step"]), float(saved["seconds"]), float(saved["loss"])
        curve = list(saved.get("curve", []))
    teacher = target.get_output_embeddings().weight.detach()[vocab.ids].to(device, torch.float32)
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=settings.precision == "bfloat16")
    scores: list[LevelAgreement] = []
    run_began, chunk_over = time.monotonic(), False
    while not chunk_over and (done := _budget_used(settings, step, seconds)) < 1.0:
        began = time.monotonic()
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(settings, step, done) * group["lr_scale"]
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        batch = train.random_batch(generator, settings.batch_tokens).to(device)
        stage = "input" if settings.kind == "mlp" and done < settings.input_stage else "output"
        model.train()
        with autocast:
            loss = draft_loss(model, batch, teacher, stage, None if log_mix is None else log_mix.exp(), settings.levels or None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step, start_seconds = step + 1, seconds
        seconds += time.monotonic() - began
        loss_value = float(loss.detach())
        loss_avg = loss_value if math.isnan(loss_avg) else 0.95 * loss_avg + 0.05 * loss_value
        chunk_over = settings.chunk_minutes is not None and time.monotonic() - run_began >= 60 * settings.chunk_minutes
        finished = chunk_over or _budget_used(settings, step, seconds) >= 1.0
        if step % settings.eval_every == 0 or finished:
            scores = _evaluate(model, held_out, autocast, log_mix, settings.levels or None)
            curve.append({"step": step, "minutes": round(seconds / 60, 2), "loss": round(loss_avg, 4),
                          "top1": [round(a.top1, 4) for a in scores]})
        if step % settings.checkpoint_every == 0 or finished:
            _save_checkpoint(path, settings, model, optimizer, step, seconds, loss_avg, log_mix, curve)
        seconds = start_seconds + time.monotonic() - began  # evaluation and checkpoints count too
        if progress is not None:
            agree = "/".join(f"{a.top1:.0%}" for a in scores) or "-"
            progress(min(int(1000 * _budget_used(settings, step, seconds)), 1000), 1000,
                     f"{stage} step {step} loss {loss_avg:.3f} held-out top-1 {agree}")
    scores = scores or _evaluate(model, held_out, autocast, log_mix, settings.levels or None)
    return model.eval(), TrainReport(step, seconds, loss_avg, scores, _learned_mix(log_mix), tuple(curve),
                                     min(_budget_used(settings, step, seconds), 1.0))


def _evaluate(
    model: TrainedDraft, held_out: FeatureSet, autocast, log_mix: torch.Tensor | None, levels: int | None = None
) -> list[LevelAgreement]:
    """Held-out agreement of what training optimises: the draft, or the draft through its mix."""
    model.eval()
    with autocast:
        return agreement(model, held_out, mix=_learned_mix(log_mix), levels=levels)


def _init_mix(settings: TrainSettings) -> ContextMix | None:
    """The mix a fine-tuned draft's starting point learned (its card's ``training.learned_mix``)."""
    if not settings.init_from:
        return None
    learned = ((read_card(draft_dir(settings.init_from)) or {}).get("training") or {}).get("learned_mix")
    return None if not learned else ContextMix(tuple(float(w) for w in learned["weights"]))


def _learned_mix(log_mix: torch.Tensor | None) -> ContextMix | None:
    return None if log_mix is None else ContextMix(tuple(log_mix.detach().exp().tolist()))


def _budget_used(settings: TrainSettings, step: int, seconds: float) -> float:
    shares = []
    if settings.steps is not None:
        shares.append(step / settings.steps)
    if settings.minutes is not None:
        shares.append(seconds / (60 * settings.minutes))
    return max(shares)


def _learning_rate(settings: TrainSettings, step: int, done: float) -> float:
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    cosine = FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    return settings.lr * warm * cosine


def _save_checkpoint(path: Path, settings, model, optimizer, step: int, seconds: float, loss: float, log_mix, curve=()) -> None:
    state = {"curve": list(curve),
        "format": CHECKPOINT_FORMAT, "settings": settings.identity(), "vocab_ids": model.vocab.ids.tolist(),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "seconds": seconds, "loss": loss,
        **({"log_mix": log_mix.detach().cpu()} if log_mix is not None else {}),
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: Path, settings: TrainSettings) -> dict[str, Any]:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise FileFormatError(f"checkpoint {path} is corrupt ({type(exc).__name__}); delete it or pass --fresh") from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(f"{path} is not a {CHECKPOINT_FORMAT} file; delete it or pass --fresh")
    # A setting added after the checkpoint was written reads as its default (what that run did).
    defaults = {f.name: f.default for f in fields(TrainSettings)}
    recorded = saved.get("settings") if isinstance(saved.get("settings"), dict) else {}
    diff = sorted(k for k, v in settings.identity().items() if recorded.get(k, defaults[k]) != v)
    if diff:
        raise ConfigError(
            f"{path} was trained with other settings ({', '.join(diff)}); pass the same settings, "
            "--fresh to start over, or another --work directory"
        )
    return saved


def discard_checkpoint(work: str | os.PathLike) -> None:
    """Start the next run from scratch (the cached features stay)."""
    (Path(work) / CHECKPOINT).unlink(missing_ok=True)


def open_training_data(paths: Sequence[str | os.PathLike]) -> list[DataStore]:
    """Open the data stores to train on; none, or an empty one, is a :class:`ConfigError`
    (checked before any model is loaded)."""
    if not paths:
        raise ConfigError("give at least one data store (--data)")
    stores = [DataStore.open(path) for path in paths]
    for store in stores:
        if not store.manifest.shards:
            raise ConfigError(f"the data store {store.root} is empty; run `sequoia draft data --out {store.root}` first")
    return stores


def train_from_store(
    loaded: LoadedModel,
    data: Sequence[DataStore],
    out: str | os.PathLike,
    work: str | os.PathLike,
    settings: TrainSettings,
    eos_token_ids: Sequence[int] = (),
    held_out_tokens: int = 128,
    progress: Progress | None = None,
    sequences: int | Sequence[int] | None = None,
) -> dict[str, Any]:
    """The whole recipe: target features of the ``data`` stores (their sequences pooled) and of
    the held-out prompts (cached in ``work``), training, the context mix fitted (unless
    ``settings.context_mix`` is 0), then the draft saved to ``out`` with a card recording the
    data, the mix, the held-out agreement per level and the bfloat16 cost per level. Returns the card."""
    cache = FeatureCache(work, loaded)
    train = cache.train(data, progress, limit=sequences)
    held_out = cache.held_out(max_new_tokens=held_out_tokens)
    device = loaded.device
    model, report = train_draft(settings, train, held_out, loaded.model, work, device, eos_token_ids, progress)
    save_draft(model, out, loaded.name, {"training": {
        "data": [{"path": str(store.root), "positions": store.manifest.positions,
                  "temperature": store.manifest.temperature, "top_p": store.manifest.top_p} for store in data],
        "data_positions": train.generated_positions,
        "sequences": train.num_sequences, "steps": report.steps, "minutes": round(report.seconds / 60, 2),
        "loss": round(report.loss, 4), "settings": asdict(settings), "device": str(device), "curve": list(report.curve),
        "budget_used": round(report.budget_used, 4),
        "target_dtype": dtype_name(loaded.dtype),
        **({"learned_mix": report.learned_mix.to_json()} if report.learned_mix is not None else {}),
    }})
    levels, draft_only = report.agreement, None
    if settings.context_mix:
        mix = fit_mix(model, train, settings.context_mix, settings.seed, out)
        alone = agreement(model, held_out) if settings.mix_loss else report.agreement
        levels, draft_only = agreement(model, held_out, mix=mix, levels=settings.levels or None), alone
    costs = level_costs(load_trained_proposer(out, loaded.model))
    update_card(out, {"evaluation": evaluation_record(levels, costs, held_out_tokens, device, draft_only)})
    return read_card(Path(out))


def fit_mix(
    model: TrainedDraft, features: FeatureSet, max_ngram: int, seed: int = 0, out: str | os.PathLike | None = None
) -> ContextMix:
    """Fit the context mix of ``model`` on ``MIX_SEQUENCES`` random sequences of ``features``
    and, with ``out``, record it in that draft's card."""
    sample = features.sample(MIX_SEQUENCES, seed)
    mix, positions = fit_context_mix(model, sample, max_ngram)
    if out is not None:
        update_card(out, {CARD_KEY: mix.to_json(sequences=sample.num_sequences, positions=positions)})
    return mix


def refit_mix(
    spec: str | os.PathLike,
    loaded: LoadedModel,
    data: Sequence[DataStore],
    work: str | os.PathLike,
    max_ngram: int = MAX_NGRAM,
    seed: int = 0,
    held_out_tokens: int = 128,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fit a saved draft's context mix on the first chunks of its training ``data`` (target
    features cached in ``work``), then re-evaluate it; returns the updated card."""
    model = load_draft(spec, loaded.model).to(loaded.device)
    features = FeatureCache(work, loaded).train(data, progress, limit=MIX_SEQUENCES)
    fit_mix(model, features, max_ngram, seed, spec)
    update_card(spec, {"evaluation": evaluate_draft(spec, loaded, work, held_out_tokens)})
    return read_card(draft_dir(spec))


def drop_mix(spec: str | os.PathLike) -> None:
    """Remove a saved draft's context mix (its evaluation is then out of date)."""
    update_card(spec, {CARD_KEY: None})
