"""The suite's set-up (``conftest.py``): which runs compile at XLA's backend optimisation level 0."""

import pytest

from conftest import selects_slow


@pytest.mark.parametrize("markexpr, slow", [("not slow", False), ("", False), ("slow", True),
                                            ("slow and not demo", True), ("not demo and slow", True)])
def test_only_runs_that_select_the_slow_tests_keep_xla_s_default_optimisation(markexpr, slow):
    assert selects_slow(markexpr) == slow
