"""The DSI paper's single-node settings, re-simulated with :mod:`sequoia.dsi`.

Timor et al. (arXiv 2405.14105, Table 2) report DSI 1.29-1.92x faster than SI for ten
off-the-shelf (target, drafter, dataset) triples on one 8-GPU node. The latencies (ms per
forward) and per-token acceptance rates below are the table's inputs as recalled when this
module was written; the table itself was not available to check them, so treat them as
approximate and correct them here if they differ. The paper does not state the lookahead of
each row; like its heatmaps, each algorithm here uses its own best lookahead.

Example::

    >>> row = reproduce(PAPER_SETTINGS[:1], samples=2000)[0]
    >>> row.speedup > 1.0   # DSI beats SI on StarCoder / HumanEval
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sequoia.dsi import DEFAULT_SAMPLES, DEFAULT_SP_DEGREE, SimResult, best_over_lookaheads

PAPER_LOOKAHEADS = tuple(range(1, 21))


@dataclass(frozen=True)
class PaperSetting:
    """One row of the paper's table: models, measured latencies (ms), acceptance, its result."""

    target: str
    drafter: str
    dataset: str
    target_ms: float
    drafter_ms: float
    acceptance: float
    reported_speedup: float  # DSI over SI, as the paper reports it

    @property
    def drafter_fraction(self) -> float:
        return self.drafter_ms / self.target_ms


PAPER_SETTINGS = (
    PaperSetting("StarCoder-15B", "StarCoder-168M", "HumanEval", 24.29, 6.92, 0.93, 1.92),
    PaperSetting("StarCoder-15B", "StarCoder-168M", "MBPP", 24.29, 7.19, 0.90, 1.66),
    PaperSetting("Phi3-14B", "Phi3-4B", "HumanEval", 52.05, 34.00, 0.95, 1.60),
    PaperSetting("Phi3-14B", "Phi3-4B", "MBPP", 52.05, 34.34, 0.94, 1.41),
    PaperSetting("Phi3-14B", "Phi3-4B", "CNN-DM", 52.05, 34.50, 0.93, 1.39),
    PaperSetting("Phi3-14B", "Phi3-4B", "Alpaca", 52.05, 33.68, 0.87, 1.30),
    PaperSetting("Vicuna-13B", "Vicuna-68M", "CNN-DM", 37.73, 2.00, 0.63, 1.47),
    PaperSetting("Vicuna-13B", "Vicuna-68M", "Alpaca", 33.09, 2.04, 0.58, 1.41),
    PaperSetting("Vicuna-7B", "Vicuna-68M", "CNN-DM", 29.38, 1.99, 0.67, 1.29),
    PaperSetting("Vicuna-7B", "Vicuna-68M", "Alpaca", 26.89, 2.10, 0.59, 1.70),
)


@dataclass(frozen=True)
class PaperRow:
    """A paper setting with SI at SI's best lookahead and DSI at DSI's best lookahead."""

    setting: PaperSetting
    si: SimResult
    dsi: SimResult

    @property
    def speedup(self) -> float:
        """Simulated DSI over SI (each at its best lookahead)."""
        return self.si.si.mean / self.dsi.dsi.mean

    def to_json(self) -> dict:
        return {
            **asdict(self.setting),
            "drafter_fraction": self.setting.drafter_fraction,
            "si_lookahead": self.si.config.lookahead,
            "si_ms_per_token": self.si.si.mean,
            "dsi_lookahead": self.dsi.config.lookahead,
            "dsi_ms_per_token": self.dsi.dsi.mean,
            "dsi_ms_per_token_stderr": self.dsi.dsi.stderr,
            "speedup_dsi_vs_si": self.speedup,
            "speedup_dsi_vs_non_si": self.dsi.dsi_speedup_vs_non_si,
            "speedup_si_vs_non_si": self.si.si_speedup,
        }


def reproduce(
    settings: Sequence[PaperSetting] = PAPER_SETTINGS,
    sp_degree: int = DEFAULT_SP_DEGREE,
    lookaheads: Sequence[int] = PAPER_LOOKAHEADS,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
) -> list[PaperRow]:
    """Simulate every setting with ``sp_degree`` target instances."""
    rows = []
    for s in settings:
        si, dsi = best_over_lookaheads(
            s.target_ms, s.drafter_ms, s.acceptance, lookaheads, sp_degree, samples, seed
        )
        rows.append(PaperRow(s, si, dsi))
    return rows
