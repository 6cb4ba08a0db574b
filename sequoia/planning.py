"""The tree a decode runs with, from what the user asked for: a tree file, the solver's tree
for a size and an acceptance file, or a default."""

from __future__ import annotations

from pathlib import Path

from sequoia.acceptance import AcceptanceResult
from sequoia.drafts.spec import DraftSpec
from sequoia.errors import ConfigError
from sequoia.solver import chain, solve
from sequoia.tree import Tree

DEFAULT_TREE_DEPTH = 4  # a chain, when neither a tree file nor a size and acceptance pick a tree


def plan_tree(
    draft: DraftSpec, tree_file: Path | None, budget: int | None, max_depth: int | None, acceptance: Path | None
) -> Tree:
    """``--tree``, else the solver's tree for ``--budget/--max-depth`` and ``--acceptance``."""
    solver_options = (budget, max_depth, acceptance)
    if tree_file is not None and any(o is not None for o in solver_options):
        raise ConfigError("give either --tree or --budget/--max-depth/--acceptance, not both")
    if draft.kind == "none":
        if tree_file is not None or any(o is not None for o in solver_options):
            raise ConfigError("--draft none decodes one token per step; drop the tree options")
        return Tree((-1,))
    if tree_file is not None:
        return Tree.load(tree_file)
    limits = draft.limits  # a trained draft fills at most its heads' levels
    if acceptance is None:
        if budget is not None or max_depth is not None:
            raise ConfigError("--budget/--max-depth need --acceptance (a sequoia-acceptance/1 file)")
        return chain(limits.cap(DEFAULT_TREE_DEPTH))
    if budget is None:
        raise ConfigError("--acceptance needs --budget (the tree size)")
    vector = AcceptanceResult.load(acceptance).for_solver
    depth = limits.cap(budget - 1 if max_depth is None else max_depth)
    return solve(vector, budget, depth).tree(budget, depth)
