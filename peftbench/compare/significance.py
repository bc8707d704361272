"""Is one method better than another, or is the difference noise? A paired bootstrap.

Two methods are scored on the same evaluation examples, each trained with several seeds. Their mean
ROUGE differs for two reasons that are not the methods: which examples happened to be in the
evaluation split, and which seeds happened to be drawn. Comparing means with the seeds' spread alone
(sqrt(s1^2 + s2^2)) ignores the first and treats the examples as independent between the methods,
when they are the same examples: an example that is hard for one method is hard for the other.

The bootstrap here resamples both sources at once: one draw of the examples (with replacement),
shared by the two methods (the pairing), and for each method its own draw of seeds (with
replacement; seed 1 of one method has nothing to do with seed 1 of the other). The statistic is the
difference of the two means over the drawn seeds and examples; its percentile interval says how far
the difference could move with other examples and other seeds. "Tie" means the interval covers 0.

With one seed per method (a GGUF against its own HF model, say) it is the ordinary paired bootstrap
over examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 4000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` in the scores' unit, with its bootstrap interval."""

    difference: float  # mean of a minus mean of b, over all seeds and examples
    low: float  # the interval's bounds (percentiles of the bootstrap distribution)
    high: float
    confidence: float
    examples: int
    seeds: tuple[int, int]  # how many seeds a and b had

    @property
    def tie(self) -> bool:
        """The interval covers 0: the data do not say which is better."""
        return self.low <= 0.0 <= self.high

    def describe(self, digits: int = 2) -> str:
        """``+1.23 [+0.40, +2.10]``: the difference and its interval."""
        return f"{self.difference:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def as_matrix(scores) -> np.ndarray:
    """Per-example scores as a (seeds, examples) array: one list per seed, or one list for one seed."""
    matrix = np.asarray(scores, dtype=float)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"scores must be a list of examples or a list of seeds' lists of examples, got shape {matrix.shape}")
    return matrix


def paired_bootstrap(a, b, *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                     seed: int = 0) -> PairedDifference:
    """How much method ``a`` beats method ``b`` on the same examples: ``a`` and ``b`` are per-example
    scores, (seeds, examples) or one list of examples each, example ``i`` the same in both."""
    a, b = as_matrix(a), as_matrix(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must score the same examples: {a.shape[1]} against {b.shape[1]}")
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    draws = np.empty(resamples)
    for i in range(resamples):
        examples = rng.integers(0, n, n)  # shared: the pairing
        seeds_a = rng.integers(0, a.shape[0], a.shape[0])
        seeds_b = rng.integers(0, b.shape[0], b.shape[0])
        draws[i] = a[np.ix_(seeds_a, examples)].mean() - b[np.ix_(seeds_b, examples)].mean()
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return PairedDifference(difference=float(a.mean() - b.mean()), low=float(low), high=float(high),
                            confidence=confidence, examples=n, seeds=(a.shape[0], b.shape[0]))
