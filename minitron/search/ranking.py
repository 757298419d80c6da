"""Stage 2 of the ranking, as pure functions: the successive-halving schedule, who survives a round,
the final ranking, and Kendall's tau between rankings.

Successive halving (Jamieson and Talwalkar, arXiv 1502.07943) with the rounds' cumulative steps
doubling and the last round, between the final two, at the flat protocol's full `max_steps`:
for 8 candidates 8 x 1/4 + 4 x 1/4 + 2 x 1/2 = 4 of the flat protocol's 8 candidate budgets.
"""
import math
from typing import Dict, List, Sequence, Tuple

from minitron.config import ConfigError


def halving_rounds(num_candidates: int, max_steps: int, halving: bool) -> List[Tuple[int, int]]:
    """[(candidates in the round, cumulative steps each has distilled for at its end)]."""
    if not halving or num_candidates <= 2:
        return [(num_candidates, max_steps)]
    num_rounds = math.ceil(math.log2(num_candidates))
    if max_steps < 2 ** (num_rounds - 1):
        raise ConfigError(f"train.max_steps: successive halving over {num_candidates} candidates needs at least "
                          f"{2 ** (num_rounds - 1)} steps, got {max_steps} (or set search.halving=false)")
    rounds, alive = [], num_candidates
    for r in range(num_rounds):
        rounds.append((alive, math.ceil(max_steps / 2 ** (num_rounds - 1 - r))))
        alive = math.ceil(alive / 2)
    return rounds


def survivors(losses: Dict[int, float], count: int) -> List[int]:
    """The `count` candidates with the lowest loss (ties to the lower index), in index order."""
    return sorted(sorted(losses, key=lambda c: (losses[c], c))[:count])


def final_order(results: Dict[int, List[float]]) -> List[int]:
    """Candidates best first: those that reached a later round ahead of those eliminated earlier,
    then by their loss in the last round they reached. results[c]: c's loss in each round it ran."""
    return sorted(results, key=lambda c: (-len(results[c]), results[c][-1], c))


def ranks(order: Sequence[int]) -> Dict[int, int]:
    """candidate -> position (0 = best)."""
    return {c: i for i, c in enumerate(order)}


def kendall_tau(x: Sequence[float], y: Sequence[float]):
    """Kendall's tau-b between two score lists over the same items (ties in either count as
    neither concordant nor discordant); None when it is undefined (fewer than 2 items, or one list
    constant)."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx = (x[i] > x[j]) - (x[i] < x[j])
            dy = (y[i] > y[j]) - (y[i] < y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else None


def tau_against(order: Sequence[int], scores: Dict[int, float]):
    """Kendall's tau between a ranking (best first) and scores (lower is better) of the same
    candidates, over the candidates that have a score."""
    common = [c for c in order if c in scores]
    position = ranks(order)
    return kendall_tau([position[c] for c in common], [scores[c] for c in common])
