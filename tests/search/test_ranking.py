"""The ranking's pure parts: the successive-halving schedule, survivors, the final order, and
Kendall's tau against scipy's reference."""
import itertools

import numpy as np
import pytest
from scipy.stats import kendalltau

from minitron.config import ConfigError
from minitron.search.ranking import (final_order, halving_rounds, kendall_tau, survivors, tau_against)


@pytest.mark.parametrize("n, expected", [
    (8, [(8, 25), (4, 50), (2, 100)]),
    (6, [(6, 25), (3, 50), (2, 100)]),
    (3, [(3, 50), (2, 100)]),
    (2, [(2, 100)]),
    (1, [(1, 100)]),
    (16, [(16, 13), (8, 25), (4, 50), (2, 100)]),
])
def test_halving_doubles_the_steps_and_the_last_two_reach_max_steps(n, expected):
    assert halving_rounds(n, 100, halving=True) == expected


@pytest.mark.parametrize("n", range(2, 33))
def test_halving_spends_at_most_the_flat_protocols_tokens_and_half_of_them_from_eight(n):
    rounds = halving_rounds(n, 400, halving=True)
    spent = sum(count * (steps - prev) for (count, steps), prev in zip(rounds, [0] + [s for _, s in rounds]))
    assert spent <= n * 400
    if n >= 8:
        assert spent <= n * 400 / 2, (n, spent)
    assert [s for _, s in rounds] == sorted(set(s for _, s in rounds))  # strictly more steps each round


def test_flat_protocol_and_too_few_steps():
    assert halving_rounds(6, 40, halving=False) == [(6, 40)]
    with pytest.raises(ConfigError, match="^train.max_steps: successive halving over 6 candidates needs at least 4"):
        halving_rounds(6, 3, halving=True)


def test_survivors_and_final_order():
    assert survivors({0: 3.0, 1: 1.0, 2: 2.0, 3: 1.0}, 2) == [1, 3]  # ties to the lower index
    # 0 and 3 reached round 3, 1 was cut after round 2, 2 after round 1
    results = {0: [5.0, 4.5, 4.2], 1: [4.9, 4.6], 2: [5.5], 3: [5.1, 4.4, 4.1]}
    assert final_order(results) == [3, 0, 1, 2]


def test_kendall_tau_matches_scipy_with_and_without_ties():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8):
        for _ in range(20):
            x, y = rng.integers(0, 4, n).tolist(), rng.normal(size=n).round(1).tolist()
            ours, ref = kendall_tau(x, y), kendalltau(x, y).statistic
            if np.isnan(ref):
                assert ours is None
            else:
                assert ours == pytest.approx(ref, abs=1e-12)
    assert kendall_tau([1], [2]) is None


def test_tau_against_a_ranking():
    order = [2, 0, 1]  # 2 best
    assert tau_against(order, {2: 1.0, 0: 2.0, 1: 3.0}) == pytest.approx(1.0)
    assert tau_against(order, {2: 3.0, 0: 2.0, 1: 1.0}) == pytest.approx(-1.0)
    assert tau_against(order, {0: 1.0, 1: 2.0}) == pytest.approx(1.0)  # only the scored ones
    for perm in itertools.permutations(range(4)):
        assert -1.0 <= tau_against(list(perm), {0: 0.0, 1: 1.0, 2: 2.0, 3: 3.0}) <= 1.0
