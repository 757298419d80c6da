"""Budgets: which candidates meet every constraint the user set, each within the tolerance either
side; a budget nothing meets is named with the nearest budget that something does meet."""
from typing import List, Sequence, Tuple

from minitron.config import ConfigError, SearchConfig
from minitron.prune.shape import Shape
from minitron.search.sizing import Sizes

BUDGET_KEYS = ("params", "non_embedding_params", "memory_gb", "flops_per_token", "active_params")

Candidate = Tuple[Shape, Sizes]


def budgets(search: SearchConfig) -> List[Tuple[str, float]]:
    """(key, budget) for every budget set, checked for sign; at least one is required."""
    set_ = [(key, getattr(search, key)) for key in BUDGET_KEYS if getattr(search, key) is not None]
    if not set_:
        raise ConfigError("search.params: set a budget (search.params, search.non_embedding_params, "
                          "search.memory_gb, search.flops_per_token or, for a mixture of experts, "
                          "search.active_params)")
    for key, value in set_:
        if value <= 0:
            raise ConfigError(f"search.{key}: must be positive, got {value}")
    if not 0 <= search.tolerance < 1:
        raise ConfigError(f"search.tolerance: must be in [0, 1), got {search.tolerance}")
    return set_


def _fmt(key: str, value: float) -> str:
    """As a user would type it back: counts whole, GiB to 4 significant digits."""
    return f"{value:.4g}" if key == "memory_gb" else str(round(value))


def within_budgets(candidates: Sequence[Candidate], search: SearchConfig, teacher: Sizes) -> List[Candidate]:
    """The candidates meeting every budget, in order. Budgets are applied one after another, so a
    failing one is named together with the nearest value among the candidates meeting the ones
    before it (the nearest feasible budget)."""
    tol = search.tolerance
    kept = list(candidates)
    for key, budget in budgets(search):
        if getattr(teacher, key) is None:
            raise ConfigError(f"search.{key}: the teacher is not a mixture of experts; every parameter is "
                              "active, use search.params")
        values = [getattr(sizes, key) for _, sizes in kept]
        meeting = [c for c, v in zip(kept, values) if abs(v - budget) <= tol * budget]
        if not meeting:
            nearest = min(values, key=lambda v: abs(v - budget))
            above = (f" is above the teacher's {_fmt(key, getattr(teacher, key))}"
                     if budget > getattr(teacher, key) else f" is met by no candidate within {tol:.0%}")
            others = " together with the budgets before it" if len(kept) < len(candidates) else ""
            raise ConfigError(f"search.{key}: {_fmt(key, budget)}{above}{others}; the nearest feasible budget is "
                              f"{_fmt(key, nearest)} (or widen search.space / search.tolerance)")
        kept = meeting
    return kept
