"""Tokens per step of a trained draft with static DP trees and with per-step trees, held out.

    python scripts/per_step_trees.py --draft smollm2-135m-chimera --max-depth 4 --out results/per-step-trees/shipped
    python scripts/per_step_trees.py --report results/per-step-trees   # table + calibration plot
    python scripts/per_step_trees.py --out results/per-step-trees/shipped --card DRAFT_DIR  # calibration into a card

Prompts: the 30 built-in evaluation prompts (never trained on) split in two: every fourth one
(8 prompts, all five categories) measures tokens per step; the other 22 calibrate. Calibration
decodes with a spine tree (8 candidates at each of ``--max-depth`` levels along the draft's
first choices): every child of a spine node is a labelled slot (sequoia/calibration.py), which
gives both the confidence calibration and the positional acceptance per depth that the DP
solver builds the static trees from. Each result is a JSON file, skipped when present
(re-running resumes). Float32 target, one thread: tokens per step do not depend on speed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from sequoia import calibration
from sequoia.acceptance import spine_tree
from sequoia.drafts.card import draft_dir, read_card
from sequoia.drafts.registry import load_trained_proposer
from sequoia.dynamic import Calibration, TreeShaper, expected_tokens_curve
from sequoia.models import eos_token_ids, load_model
from sequoia.prompts import load_prompts, render_prompt
from sequoia.sampling import SamplingConfig
from sequoia.solver import solve

MODES = {"greedy": SamplingConfig(0.0), "t1": SamplingConfig(1.0)}
SIZES = (16, 32, 64)
WIDTH = 8
CALIBRATION_DEPTH = 4  # deeper slots are pooled: few are reached, and acceptance hardly moves there


def prompt_split(tokenizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    ids = [torch.tensor(render_prompt(tokenizer, p.text, True)) for p in load_prompts("builtin")]
    return [x for i, x in enumerate(ids) if i % 4 == 0], [x for i, x in enumerate(ids) if i % 4 != 0]


def acceptance_rows(m: calibration.Measurement, depth: int, pooled: int = CALIBRATION_DEPTH) -> list[list[float]]:
    """Weighted mean slot label per (depth, rank) of a spine run -- the positional acceptance
    given that verification reaches the parent, by depth; depths from ``pooled`` on share a row."""
    d, _, y, w = m.slots()
    rows = []
    for level in range(1, depth + 1):
        at = (d == level) if level < pooled else (d >= pooled)
        labels, weights = y[at].reshape(-1, WIDTH), w[at].reshape(-1, WIDTH)
        rows.append(((labels * weights).sum(0) / max(weights[:, 0].sum(), 1e-9)).tolist())
    return rows


def run(args) -> None:
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu", threads=1)
    eos = eos_token_ids(loaded.model, loaded.tokenizer)
    evaluate, calibrate = prompt_split(loaded.tokenizer)
    depth = args.max_depth
    for mode, sampling in MODES.items():
        cal_path = out / f"calibration-{mode}.json"
        if not cal_path.is_file():
            proposer = load_trained_proposer(args.draft, loaded.model)
            m = calibration.measure(loaded.model, proposer, calibrate[: args.calibration_prompts], spine_tree(WIDTH, depth),
                                    sampling, args.calibration_tokens, eos)
            cal = calibration.fit(m, "greedy" if sampling.greedy else "stochastic", CALIBRATION_DEPTH,
                                  {"draft": args.draft, "prompts": f"builtin, {args.calibration_prompts} calibration prompts",
                                   "tokens": args.calibration_tokens, "temperature": sampling.temperature})
            cal.save(cal_path)
            (out / f"acceptance-{mode}.json").write_text(json.dumps(
                {"rows": acceptance_rows(m, depth), "spine": m.summary()}, indent=1))
            print(mode, "calibrated", m.summary(), flush=True)
        cal = Calibration.load(cal_path)
        rows = np.asarray(json.loads((out / f"acceptance-{mode}.json").read_text())["rows"])
        table = solve(rows, max(SIZES), depth)
        for size in SIZES:
            for policy in ("static", "shaped"):
                path = out / f"tau-{mode}-{policy}-{size}.json"
                if path.is_file():
                    continue
                if policy == "static":
                    tree = table.tree(size, depth)
                    proposer = load_trained_proposer(args.draft, loaded.model)
                    predicted = float(table.values[size, depth])
                else:
                    tree = _budget(size, depth)
                    shaper = TreeShaper(cal, cal, WIDTH)
                    proposer = load_trained_proposer(args.draft, loaded.model)
                    proposer.shaper = shaper
                    predicted = None
                m = calibration.measure(loaded.model, proposer, evaluate, tree, sampling, args.tokens, eos)
                result = {"draft": args.draft, "mode": mode, "policy": policy, "size": size, "max_depth": depth,
                          "tree_depth": tree.depth, "prompts": len(evaluate), "new_tokens": args.tokens, **m.summary()}
                if predicted is not None:
                    result["predicted_tokens_per_step"] = round(predicted, 4)
                else:
                    result["beam"], result["width"] = shaper.beam_for(size), WIDTH
                    result["reliability"] = calibration.reliability(cal, m)
                    result["curve"] = [round(x, 4) for x in expected_tokens_curve(m.sorted_values, size)[1:]]
                path.write_text(json.dumps(result, indent=1))
                print(mode, policy, size, m.summary(), flush=True)


def _budget(size: int, depth: int):
    """A budget tree: ``size`` nodes and depth ``depth`` (a shaping proposer reads only those)."""
    from sequoia.tree import Tree

    return Tree.from_children_counts([size - depth, 1] + [0] * (size - depth - 1) + [1] * (depth - 2))


def write_card(out: Path, card_dir: str) -> None:
    """Record the two calibrations in a draft's card, so ``--draft NAME:per-step`` uses them,
    and the measured gain of per-step over static trees by size, which the optimizer prices."""
    from sequoia.drafts.card import update_card

    shaper = TreeShaper(Calibration.load(out / "calibration-greedy.json"), Calibration.load(out / "calibration-t1.json"), WIDTH)
    gain = {}
    for mode, key in (("greedy", "greedy"), ("t1", "stochastic")):
        tau = {policy: {size: json.loads((out / f"tau-{mode}-{policy}-{size}.json").read_text())["tokens_per_step"]
                        for size in SIZES} for policy in ("static", "shaped")}
        gain[key] = {str(size): round(tau["shaped"][size] / tau["static"][size], 4) for size in SIZES}
    update_card(card_dir, {"per_step_trees": {**shaper.to_json(), "gain": gain}})


def training_runs(root: Path) -> dict[str, tuple[float, list[dict]]]:
    """Each recorded card's training curve, after the minutes of the draft it started from; the
    shipped draft (no curve recorded) as one point: its held-out agreement at every level."""
    shipped = read_card(draft_dir("smollm2-135m-chimera"))["training"]["minutes"]
    reused = json.loads((root / "shipped-reused-agreement.json").read_text())
    runs = {"shipped Chimera (4 heads, last reused deeper)": (0.0, [{"minutes": shipped, "top1": [r["top1"] for r in reused]}])}
    for path in sorted(root.glob("*-card.json")):
        training = json.loads(path.read_text())["training"]
        start = shipped if training["settings"].get("init_from") == "smollm2-135m-chimera" else 0.0
        runs[f"{path.name.removesuffix('-card.json')} ({training['steps']} steps)"] = (start, training["curve"])
    return runs


def report(root: Path) -> None:
    from sequoia.figures import calibration_png, training_curve_png, write_png

    rows = {}
    for path in sorted(root.glob("*/tau-*.json")):
        r = json.loads(path.read_text())
        rows[(path.parent.name, r["mode"], r["policy"], r["size"])] = r
    summary = [{"draft": k[0], "mode": k[1], "policy": k[2], "size": k[3], **{x: v[x] for x in (
        "tokens_per_step", "predicted_tokens_per_step", "mean_tree_size", "tree_depth", "draft_ms_per_step", "target_ms_per_step")
        if x in v}} for k, v in sorted(rows.items())]
    reliability = {f"{k[0]} {k[1]} n={k[3]}": v["reliability"] for k, v in rows.items() if "reliability" in v}
    (root / "summary.json").write_text(json.dumps({"runs": summary, "reliability": reliability}, indent=1))
    write_png(root / "calibration.png", calibration_png({k: v for k, v in reliability.items() if k.endswith("n=32")}))
    write_png(root / "training-curve.png", training_curve_png(training_runs(root)))
    for r in summary:
        print(r)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft")
    parser.add_argument("--out")
    parser.add_argument("--max-depth", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--calibration-prompts", type=int, default=12)
    parser.add_argument("--calibration-tokens", type=int, default=40)
    parser.add_argument("--report")
    parser.add_argument("--card")
    args = parser.parse_args()
    if args.report:
        report(Path(args.report))
    elif args.card:
        write_card(Path(args.out), args.card)
    else:
        run(args)
