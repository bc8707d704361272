"""The paired bootstrap (peftbench.compare.significance) on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from peftbench.compare.significance import paired_bootstrap


def test_a_constant_gain_on_every_example_is_that_gain_with_no_doubt():
    rng = np.random.default_rng(1)
    b = np.tile(rng.uniform(10, 60, 200), (3, 1))  # three seeds that agree on every example
    result = paired_bootstrap(b + 1.5, b)
    assert result.difference == pytest.approx(1.5)
    assert result.low == pytest.approx(1.5) and result.high == pytest.approx(1.5)
    assert not result.tie


def test_one_seed_each_gives_the_textbook_paired_interval():
    """Per-example differences with standard deviation 10 on 2,000 examples: the 95% interval is the mean
    difference +- 1.96 * 10 / sqrt(2000) = +-0.438."""
    rng = np.random.default_rng(2)
    hardness = rng.uniform(0, 80, 2000)
    differences = rng.normal(0.0, 10.0, 2000)
    differences -= differences.mean()  # a true difference of exactly 0
    result = paired_bootstrap(hardness + differences, hardness)
    assert result.difference == pytest.approx(0.0, abs=1e-9)
    assert result.tie
    half_width = (result.high - result.low) / 2
    assert half_width == pytest.approx(1.96 * 10 / 2000 ** 0.5, rel=0.1)


def test_pairing_sees_a_small_gain_that_the_spread_of_examples_hides():
    """Examples differ far more from each other (hardness 0-80) than the methods do (a is 0.5 better on
    each, +-1). Unpaired, the two means' standard error is ~1.3, so 0.5 looks like a tie; paired, it is
    not one."""
    rng = np.random.default_rng(3)
    hardness = rng.uniform(0, 80, 800)
    a = hardness + 0.5 + rng.normal(0, 1, 800)
    b = hardness + rng.normal(0, 1, 800)
    unpaired_se = (a.var(ddof=1) / 800 + b.var(ddof=1) / 800) ** 0.5
    assert abs(a.mean() - b.mean()) < 1.96 * unpaired_se  # what a comparison of means would say: a tie
    result = paired_bootstrap(a, b)
    assert not result.tie and result.low > 0.2


def test_seeds_that_disagree_widen_the_interval():
    """Same examples, same mean gain of 1.0; when a's three seeds lie 3 points apart the interval must grow
    (and here cover 0), because another draw of seeds could move a's mean."""
    rng = np.random.default_rng(4)
    hardness = rng.uniform(0, 80, 500)
    b = np.stack([hardness + rng.normal(0, 1, 500) for _ in range(3)])
    steady = np.stack([hardness + 1.0 + rng.normal(0, 1, 500) for _ in range(3)])
    scattered = np.stack([hardness + 1.0 + shift + rng.normal(0, 1, 500) for shift in (-3.0, 0.0, 3.0)])
    narrow, wide = paired_bootstrap(steady, b), paired_bootstrap(scattered, b)
    assert not narrow.tie
    assert (wide.high - wide.low) > 5 * (narrow.high - narrow.low)
    assert wide.tie


def test_the_same_inputs_give_the_same_interval():
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0, 50, (3, 100)), rng.uniform(0, 50, (3, 100))
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)
    assert paired_bootstrap(a, b).describe().startswith(("+", "-"))


def test_scores_of_different_examples_are_refused():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0])
