"""The one success rule: seeds, power, cost, utility and the relearning check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scvi_unlearn as su

rule = su.audit.unlearning_success


def test_most_seeds_is_two_thirds_on_counts_and_on_arrays():
    assert [su.audit.most_seeds(k, 3) for k in range(4)] == [False, False, True, True]
    assert su.audit.most_seeds(4, 6) and not su.audit.most_seeds(3, 6)
    counts = pd.Series([1, 2, 3])
    assert su.audit.most_seeds(counts, pd.Series([3, 3, 3])).tolist() == [False, True, True]


def test_a_method_that_forgot_in_most_seeds_cheaply_succeeds():
    assert rule([True, True, False], time_vs_retrain=0.2) == su.audit.SUCCESS
    assert rule([True, False, False], time_vs_retrain=0.2) == "fail"


@pytest.mark.parametrize(
    ("kwargs", "label"),
    [
        ({"time_vs_retrain": 1.0}, "fail"),  # no cheaper than retraining
        ({"time_vs_retrain": 0.2, "utility_change": [0.04, 0.07, 0.06]}, "fail"),  # mean +5.7%
        ({"time_vs_retrain": 0.2, "utility_change": [0.04, 0.05, 0.05]}, "SUCCESS"),
        ({"time_vs_retrain": 0.2, "powered": [True, False, True]}, "underpowered"),
        ({"time_vs_retrain": 0.2, "relearn_leaks": [True, True]}, su.audit.SUCCESS_LABELS[2]),
        ({"time_vs_retrain": 0.2, "relearn_leaks": [True, False, False]}, "SUCCESS"),
        ({"time_vs_retrain": 0.2, "relearn_leaks": []}, "SUCCESS"),  # none checked
    ],
)
def test_each_criterion_can_fail_a_row_that_forgot(kwargs, label):
    assert rule(np.ones(3, bool), **kwargs) == label


def test_power_is_judged_before_anything_else():
    assert rule([False], time_vs_retrain=5.0, powered=[False]) == "underpowered"


def test_no_seed_is_an_error():
    with pytest.raises(ValueError, match="at least one seed"):
        rule([], time_vs_retrain=0.1)
