"""The tree-scaling report: expected tokens per step vs tree size for every tree shape.

Built from :func:`sequoia.solver.scaling_table`; written as ``sequoia-scaling/1`` JSON, a
Markdown table at powers of two, and a plot (:func:`sequoia.figures.scaling_png`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sequoia.figures import scaling_png, write_png
from sequoia.files import write_atomic, write_json_atomic

SCALING_FORMAT = "sequoia-scaling/1"


@dataclass(frozen=True)
class ScalingReport:
    """Expected tokens per step of the best tree of each shape, for sizes 1..max_size."""

    acceptance: np.ndarray  # [k] the vector the curves were solved for
    max_depth: int
    curves: dict[str, np.ndarray]  # shape -> [max_size] expected tokens at sizes 1..max_size

    @property
    def max_size(self) -> int:
        return len(self.curves["sequoia"])

    def rows(self) -> list[list[str]]:
        """Table rows at powers of two and the largest size: size, then one value per shape."""
        sizes = sorted({*(2**i for i in range(self.max_size.bit_length())), self.max_size})
        return [[str(n)] + [f"{self.curves[name][n - 1]:.3f}" for name in self.curves] for n in sizes]

    def to_json(self) -> dict[str, Any]:
        return {"format": SCALING_FORMAT, "acceptance": self.acceptance.tolist(), "max_depth": self.max_depth,
                "sizes": list(range(1, self.max_size + 1)),
                "expected_tokens": {k: v.tolist() for k, v in self.curves.items()}}

    def markdown(self) -> str:
        caption = (f"Expected tokens per step, best tree of each shape (p = {self.acceptance.tolist()}, "
                   f"depth <= {self.max_depth})")
        header = ["| size | " + " | ".join(self.curves) + " |", "|---" * (len(self.curves) + 1) + "|"]
        return "\n".join([caption, "", *header, *("| " + " | ".join(row) + " |" for row in self.rows())]) + "\n"

    def write(self, png: str | os.PathLike) -> list[Path]:
        """Write the PNG at ``png`` and the .json and .md beside it; returns the three paths."""
        png = Path(png)
        paths = [png.with_suffix(".json"), png.with_suffix(".md"), png]
        write_json_atomic(paths[0], self.to_json())
        text = self.markdown()
        write_atomic(paths[1], lambda tmp: tmp.write_text(text))
        write_png(png, scaling_png(self.curves, self.acceptance, self.max_depth))
        return paths
