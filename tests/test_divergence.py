"""A run whose loss goes non-finite fails loudly instead of saving a broken adapter."""

import pytest

from peftbench.errors import PeftbenchError
from peftbench_plugins.trainers.hf import _raise_if_diverged


def test_finite_history_passes():
    _raise_if_diverged([{"loss": 2.1, "grad_norm": 0.7, "step": 1}, {"eval_loss": 1.9, "step": 10}])


def test_nan_from_the_first_step_points_at_numerics_not_the_learning_rate():
    with pytest.raises(PeftbenchError, match="grad_norm became nan at step 1 .a numerical problem") as err:
        _raise_if_diverged([{"loss": 6.9, "grad_norm": float("nan"), "step": 1}])
    assert "fp32" in err.value.fix


def test_later_divergence_suggests_a_lower_learning_rate():
    with pytest.raises(PeftbenchError, match="eval_loss became inf at step 40") as err:
        _raise_if_diverged([{"loss": 2.0, "grad_norm": 0.5, "step": 1}, {"eval_loss": float("inf"), "step": 40}])
    assert "learning_rate" in err.value.fix
