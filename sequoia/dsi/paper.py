"""The DSI paper's single-node settings, re-simulated with :mod:`sequoia.dsi`.

Source of the inputs (checked against the PDF): Timor et al., "Distributed Speculative
Inference of Large Language Models is Provably Faster", PMLR 262 (ENLSP workshop at NeurIPS
2024), pp. 336-354 -- the peer-reviewed version of arXiv 2405.14105 with the same abstract
claim, "DSI is 1.29-1.92x faster than SI". ``PAPER_SETTINGS`` is its **Table 1** (p. 7):

* *target / drafter latency (ms)*: the TPOT, i.e. the mean latency of one forward after the
  first token (tokens 2-20 of 50 random prompts per dataset, one A100 80GB). The paper also
  measured the TTFT but, in its words, "all latency figures in Table 1 refer to TPOT"; no
  TTFT is published, so every forward here lasts the TPOT.
* *acceptance*: ``1 - 1 / (1 + n)``, ``n`` the mean length of the longest exact-match run
  between drafter and target (Section 4, p. 8).
* *drafter %*: as printed; it can differ by 0.1 from the ratio of the rounded latencies.
* *speed-up DSI vs SI*: from "simulations with thread pools" (Section 4, p. 8): forwards
  replaced by waits of the latencies above, 50 generated tokens, lookahead in {1, 5, 10}, DSI
  also searched over 1 and 7 target instances; configurations that need more than seven target
  servers (``ceil(target / (lookahead * drafter))``) are not considered (Section 5, p. 9).
  The text does not say which SI lookahead a row reports; SI takes its best one here, as in
  the paper's heatmaps (Section 4, p. 9).

The later ICLR 2025 version (arXiv v5, "Table 2") was not readable here; it keeps the range.

Two speed-up definitions are simulated (:data:`BEST_LOOKAHEAD`, ours; :data:`PAPER_PROTOCOL`,
the paper's above), and :func:`threadpool_accounting` gives the expected ratio under the cost
accounting of the authors' thread-pool script, which explains why the paper's numbers are
higher than a faithful SI baseline gives (see its docstring).

Example::

    >>> row = reproduce(PAPER_SETTINGS[4:5], samples=2000)[0]   # StarCoder / HumanEval
    >>> row.speedup > 1.3
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from sequoia.dsi.simulator import DEFAULT_HORIZON, DEFAULT_SAMPLES, DEFAULT_SP_DEGREE, DSIConfig, SimResult, simulate
from sequoia.errors import ConfigError

PAPER_SOURCE = (
    "Timor et al., PMLR 262 (ENLSP @ NeurIPS 2024), pp. 336-354, Table 1 (p. 7) and Sections 4-5 "
    "(pp. 7-9): https://raw.githubusercontent.com/mlresearch/v262/main/assets/timor24a/timor24a.pdf"
)
THREADPOOL_SOURCE = (
    "github.com/keyboardAnt/distributed-speculative-inference, dsi/online/run/simulation_core.py "
    "at 91ab8b9 (2024-07-01; same structure in dsi/online/simul/core.py on main)"
)
REPORTED_RANGE = (1.29, 1.92)
PAPER_LOOKAHEADS = tuple(range(1, 21))


@dataclass(frozen=True)
class PaperSetting:
    """One row of the paper's Table 1: models, TPOT latencies (ms), acceptance, its result."""

    target: str
    drafter: str
    dataset: str
    target_ms: float  # TPOT of the target
    drafter_ms: float  # TPOT of the drafter
    reported_drafter_percent: float  # "Drafter Latency (%)" as printed
    acceptance: float
    reported_speedup: float  # "Speedup DSI vs. SI"

    @property
    def drafter_fraction(self) -> float:
        return self.drafter_ms / self.target_ms


PAPER_SETTINGS = (
    PaperSetting("Vicuna-13B", "Vicuna-68M", "CNN-DM", 37.7, 2.5, 6.5, 0.63, 1.47),
    PaperSetting("Vicuna-13B", "Vicuna-68M", "Alpaca", 33.3, 2.5, 7.4, 0.58, 1.41),
    PaperSetting("Vicuna-7B", "Vicuna-68M", "CNN-DM", 29.4, 2.5, 8.4, 0.67, 1.29),
    PaperSetting("Vicuna-7B", "Vicuna-68M", "Alpaca", 26.0, 2.5, 9.5, 0.59, 1.70),
    PaperSetting("StarCoder-15B", "StarCoder-168M", "HumanEval", 20.6, 6.8, 32.3, 0.93, 1.92),
    PaperSetting("StarCoder-15B", "StarCoder-168M", "MBPP", 21.0, 6.8, 32.9, 0.90, 1.66),
    PaperSetting("Phi3-14B", "Phi3-4B", "HumanEval", 52.1, 34.0, 65.3, 0.95, 1.41),
    PaperSetting("Phi3-14B", "Phi3-4B", "MBPP", 52.2, 34.3, 65.8, 0.94, 1.37),
    PaperSetting("Phi3-14B", "Phi3-4B", "CNN-DM", 52.4, 34.6, 66.0, 0.93, 1.39),
    PaperSetting("Phi3-14B", "Phi3-4B", "Alpaca", 49.6, 33.4, 67.4, 0.87, 1.60),
)


@dataclass(frozen=True)
class Protocol:
    """How DSI's speed-up over SI is defined: what each algorithm may choose, over what run.

    SI takes its best lookahead; DSI its best (lookahead, SP degree) among those that need at
    most ``max_target_servers`` target instances to never queue, ``ceil(target / (k * drafter))``
    (None: no such limit -- the simulator queues verifications when all instances are busy).
    ``horizon`` is the generation length, which caps one run of correct drafts.
    """

    name: str
    lookaheads: tuple[int, ...]
    sp_degrees: tuple[int, ...]
    horizon: int
    max_target_servers: int | None = None

    def describe(self) -> str:
        ks = self.lookaheads
        k_text = (f"{ks[0]}..{ks[-1]}" if len(ks) > 2 and ks == tuple(range(ks[0], ks[-1] + 1))
                  else "{" + ", ".join(map(str, ks)) + "}")
        sp_text = ("SP degree " + str(self.sp_degrees[0]) if len(self.sp_degrees) == 1
                   else "SP degree in {" + ", ".join(map(str, self.sp_degrees)) + "}")
        limit = ("" if self.max_target_servers is None else
                 f", no DSI configuration needing more than {self.max_target_servers} target servers")
        return (f"{self.horizon}-token generation; SI at its best lookahead in {k_text}; DSI at its "
                f"best lookahead in {k_text} and {sp_text}{limit}")


BEST_LOOKAHEAD = Protocol("best lookahead", PAPER_LOOKAHEADS, (DEFAULT_SP_DEGREE,), DEFAULT_HORIZON)
PAPER_PROTOCOL = Protocol("paper protocol", (1, 5, 10), (1, 7), 50, max_target_servers=7)


def servers_needed(target_ms: float, drafter_ms: float, lookahead: int) -> int:
    """Target instances DSI needs so that no verification waits: ``ceil(t / (k * c))``."""
    return math.ceil(target_ms / (lookahead * drafter_ms) - 1e-9)


@dataclass(frozen=True)
class PaperRow:
    """A paper setting with SI and DSI each at the best choice that ``protocol`` allows."""

    setting: PaperSetting
    si: SimResult
    dsi: SimResult
    protocol: Protocol = BEST_LOOKAHEAD

    @property
    def speedup(self) -> float:
        """Simulated DSI over SI (each at its best choice)."""
        return self.si.si.mean / self.dsi.dsi.mean

    def to_json(self) -> dict:
        return {
            **asdict(self.setting),
            "drafter_fraction": self.setting.drafter_fraction,
            "protocol": self.protocol.name,
            "horizon": self.dsi.config.horizon,
            "si_lookahead": self.si.config.lookahead,
            "si_ms_per_token": self.si.si.mean,
            "dsi_lookahead": self.dsi.config.lookahead,
            "dsi_sp_degree": self.dsi.config.sp_degree,
            "dsi_ms_per_token": self.dsi.dsi.mean,
            "dsi_ms_per_token_stderr": self.dsi.dsi.stderr,
            "speedup_dsi_vs_si": self.speedup,
            "speedup_dsi_vs_non_si": self.dsi.dsi_speedup_vs_non_si,
            "speedup_si_vs_non_si": self.si.si_speedup,
        }


def reproduce(
    settings: Sequence[PaperSetting] = PAPER_SETTINGS,
    protocol: Protocol = BEST_LOOKAHEAD,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> list[PaperRow]:
    """Simulate every setting; SI and DSI each at the best choice ``protocol`` allows."""
    if not protocol.lookaheads or not protocol.sp_degrees:
        raise ConfigError("a protocol needs at least one lookahead and one SP degree")
    rows = []
    for s in settings:
        results = [
            simulate(DSIConfig(s.target_ms, s.drafter_ms, s.acceptance, k, sp, protocol.horizon),
                     samples, seed)
            for k in protocol.lookaheads for sp in protocol.sp_degrees
        ]
        allowed = [r for r in results if protocol.max_target_servers is None
                   or servers_needed(s.target_ms, s.drafter_ms, r.config.lookahead)
                   <= protocol.max_target_servers]
        if not allowed:
            raise ConfigError(f"{s.target} / {s.drafter} / {s.dataset}: every DSI configuration "
                              f"needs more than {protocol.max_target_servers} target servers")
        si = min(results, key=lambda r: r.si.mean)  # SI: one target, no server limit
        rows.append(PaperRow(s, si, min(allowed, key=lambda r: r.dsi.mean), protocol))
    return rows


@dataclass(frozen=True)
class ThreadpoolEstimate:
    """Expected DSI-over-SI ratios under the authors' thread-pool script's accounting."""

    setting: PaperSetting
    si_lookahead: int
    dsi_lookahead: int
    speedup: float  # SI as the script charges it: extra target forward, no bonus tokens
    speedup_without_extra_forward: float  # SI without the extra forward, still no bonus tokens
    speedup_standard_si: float  # the usual SI (bonus token per fully accepted step) vs that DSI

    def to_json(self) -> dict:
        return {"si_lookahead": self.si_lookahead, "dsi_lookahead": self.dsi_lookahead,
                "speedup_dsi_vs_si": self.speedup,
                "speedup_without_extra_si_forward": self.speedup_without_extra_forward,
                "speedup_vs_standard_si": self.speedup_standard_si}


def threadpool_accounting(
    setting: PaperSetting,
    lookaheads: Sequence[int] = PAPER_PROTOCOL.lookaheads,
    max_target_servers: int = 7,
    max_accepted: int = 20,
) -> ThreadpoolEstimate:
    """Expected time per token of SI and DSI as the authors' thread-pool script counts them.

    Not a model of SI: it explains the paper's numbers. In that script (``THREADPOOL_SOURCE``)
    every iteration -- from the start and after each rejection -- samples ``C``, the number of
    accepted drafts (geometric, at most ``max_accepted`` = its ``draft_tokens_until_fail``),
    first starts a target forward on the current prefix with no drafts, then drafts without
    stopping and submits a verification every ``k`` drafts; the first verification covering
    more than ``C`` drafts ends the iteration, which adds ``C`` tokens for either algorithm.
    For DSI that first forward runs beside the drafter (its non-SI thread), so an iteration
    lasts ``m * k * c + t`` with ``m = C // k + 1`` verifications (enough target servers
    assumed, as the paper's limit on servers ensures). For SI the calls block, so an iteration
    lasts ``t + m * (k * c + t)``, which charges SI twice over: (i) a target forward per
    iteration that SI does not need (its verification already yields the corrected token) and
    (ii) ``k`` tokens, not ``k + 1``, per fully accepted verification (the drafter goes on
    instead of taking the target's bonus token). ``speedup`` has both, the second ratio drops
    (i), the third compares the usual SI, ``(k * c + t) / E[min(G, k) + 1]`` per token, with
    the same DSI counted with the corrected token, ``(E[m] * k * c + t) / (E[C] + 1)``. Each
    algorithm takes its best lookahead; the 50-token run's ends, the TTFT, threads and the
    process restarted at every rejection are left out.
    """
    a, t, c = setting.acceptance, setting.target_ms, setting.drafter_ms
    accepted = np.arange(max_accepted + 1)
    pmf = a**accepted * (1 - a)
    pmf[-1] = a**max_accepted  # the cap takes the tail
    mean_accepted = float(pmf @ accepted)
    si, si_plain, si_standard, dsi, dsi_standard = {}, {}, {}, {}, {}
    for k in lookaheads:
        m = float(pmf @ (accepted // k + 1))  # expected verifications per iteration
        si[k], si_plain[k] = t + m * (k * c + t), m * (k * c + t)
        tokens_per_step = k + 1.0 if a == 1.0 else (1 - a ** (k + 1)) / (1 - a)
        si_standard[k] = (k * c + t) / tokens_per_step  # per token
        if servers_needed(t, c, k) <= max_target_servers:
            dsi[k] = m * k * c + t
            dsi_standard[k] = dsi[k] / (mean_accepted + 1)  # per token
    if not dsi:
        raise ConfigError(f"every lookahead needs more than {max_target_servers} target servers")
    k_si, k_dsi = min(si, key=si.get), min(dsi, key=dsi.get)
    return ThreadpoolEstimate(setting, k_si, k_dsi, si[k_si] / dsi[k_dsi],
                              min(si_plain.values()) / dsi[k_dsi],
                              min(si_standard.values()) / min(dsi_standard.values()))


@dataclass(frozen=True)
class PaperComparison:
    """One paper setting under both definitions, the thread-pool accounting and the paper."""

    ours: PaperRow
    paper: PaperRow
    threadpool: ThreadpoolEstimate

    @property
    def setting(self) -> PaperSetting:
        return self.ours.setting

    def to_json(self) -> dict:
        def result(row: PaperRow) -> dict:
            return {k: v for k, v in row.to_json().items() if k not in asdict(row.setting)
                    and k != "drafter_fraction"}

        return {**asdict(self.setting), "drafter_fraction": self.setting.drafter_fraction,
                "best_lookahead": result(self.ours), "paper_protocol": result(self.paper),
                "threadpool_accounting": self.threadpool.to_json()}


def compare(
    settings: Sequence[PaperSetting] = PAPER_SETTINGS,
    sp_degree: int = DEFAULT_SP_DEGREE,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> list[PaperComparison]:
    """Every setting under :data:`BEST_LOOKAHEAD` (with ``sp_degree``) and :data:`PAPER_PROTOCOL`."""
    ours = reproduce(settings, replace(BEST_LOOKAHEAD, sp_degrees=(sp_degree,)), samples, seed)
    paper = reproduce(settings, PAPER_PROTOCOL, samples, seed)
    return [PaperComparison(o, p, threadpool_accounting(o.setting)) for o, p in zip(ours, paper)]


def _span(values: Sequence[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}x"


def paper_markdown(rows: Sequence[PaperComparison], samples: int, seed: int) -> str:
    """The results/dsi_paper_table.md page: inputs and their source, definitions, table, why."""
    ours, paper = rows[0].ours.protocol, rows[0].paper.protocol
    span_ours = _span([r.ours.speedup for r in rows])
    span_paper = _span([r.paper.speedup for r in rows])
    span_pool = _span([r.threadpool.speedup for r in rows])
    span_plain = _span([r.threadpool.speedup_without_extra_forward for r in rows])
    span_standard = _span([r.threadpool.speedup_standard_si for r in rows])
    lo, hi = REPORTED_RANGE
    lines = [
        "# DSI vs SI on the paper's single-node settings (simulated)",
        "",
        f"Written by `sequoia simulate dsi --paper-table` ({samples} Monte Carlo epochs per "
        f"configuration, seed {seed}). The paper reports DSI {lo:.2f}-{hi:.2f}x faster than SI.",
        "",
        "**Inputs** are the paper's Table 1, checked against the PDF: " + PAPER_SOURCE + ". "
        "Target and drafter ms are TPOT (mean ms per forward after the first token, one A100 "
        "80GB); the paper measured TTFT too but publishes only TPOT, so every simulated forward "
        "lasts the TPOT. Acceptance is its per-token rate 1 - 1/(1 + mean exact-match run). "
        "\"drafter %\" is as printed. SP degree = target instances (7 + the drafter = 8 GPUs).",
        "",
        "**Definitions of the speed-up** (DSI ms/token over SI ms/token; SI needs one target):",
        "",
        f"* *ours* -- {ours.describe()}: {span_ours}.",
        f"* *paper protocol* -- the paper's thread-pool experiment (Sections 4-5): "
        f"{paper.describe()}: {span_paper}.",
        f"* *thread-pool accounting* -- the expected ratio under the cost accounting of the "
        f"authors' thread-pool script ({THREADPOOL_SOURCE}), closed form in "
        f"`sequoia.dsi.paper.threadpool_accounting`: {span_pool}, inside the reported "
        f"{lo:.2f}-{hi:.2f}x.",
        "",
        "| target | drafter | dataset | target ms | drafter ms | drafter % | acceptance "
        "| SI k | SI ms/tok | DSI k | DSI ms/tok | DSI vs SI, ours "
        "| paper protocol: SI k, DSI k/SP | DSI vs SI, paper protocol "
        "| thread-pool accounting | paper | DSI vs non-SI, ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, o, p = r.setting, r.ours, r.paper
        lines.append(
            f"| {s.target} | {s.drafter} | {s.dataset} | {s.target_ms:.1f} | {s.drafter_ms:.1f} "
            f"| {s.reported_drafter_percent:.1f} | {s.acceptance:.2f} | {o.si.config.lookahead} "
            f"| {o.si.si.mean:.2f} | {o.dsi.config.lookahead} | {o.dsi.dsi.mean:.2f} "
            f"| {o.speedup:.2f}x | {p.si.config.lookahead}, {p.dsi.config.lookahead}/"
            f"{p.dsi.config.sp_degree} | {p.speedup:.2f}x | {r.threadpool.speedup:.2f}x "
            f"| {s.reported_speedup:.2f}x | {o.dsi.dsi_speedup_vs_non_si:.2f}x |"
        )
    lines += [
        "",
        "**Why the simulator does not reach the reported range.** With the paper's own inputs "
        f"and protocol it gives {span_paper} (our definition: {span_ours}). The gap is in the "
        "SI baseline, not in DSI. In the authors' script every iteration (the start and each "
        "rejection) begins with a target forward on the current prefix, then the drafter drafts "
        "without stopping and a verification is sent every k drafts. DSI runs these beside the "
        "drafter; SI waits for each, so SI (i) pays one target forward per rejection that real "
        "SI does not (its verification already yields the corrected token) and (ii) gets k, "
        "not k + 1, tokens from each fully accepted verification (no bonus token). With both, "
        f"the expected ratio is {span_pool}; without (i), {span_plain}; the usual SI against "
        f"that same DSI gives {span_standard}, below our simulator's {span_paper}, so the "
        "script's DSI is not faster than the simulated one. The reported "
        "rows scatter around the thread-pool expectations because they are wall-clock "
        "thread-pool runs of 50 tokens: the script restarts a process at every rejection "
        "(overhead paid per iteration by both, which pulls the ratio towards 1, most for the "
        "low-acceptance Vicuna rows), its first committed version reseeds NumPy with "
        "`int(time.time())` at every iteration (iterations within the same second draw the "
        "same number of accepted drafts), and a TTFT longer than the TPOT is paid on each of "
        "DSI's target threads but once by SI. None of these is a property of DSI, so the "
        "simulator keeps one latency per forward and the usual SI baseline.",
    ]
    return "\n".join(lines) + "\n"
