"""Run settings: the named and numeric values of Clark et al.'s conventions, and refusals."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError, RunConfig, parse_entropy_epsilon


@pytest.mark.parametrize(("value", "expected"), [
    ("clark", 1e-4), ("none", 0.0), ("0", 0.0), ("0.25", 0.25), (1e-3, 1e-3), (" clark ", 1e-4),
])
def test_entropy_epsilon_from_a_name_or_a_number(value: str | float, expected: float) -> None:
    assert parse_entropy_epsilon(value) == expected


@pytest.mark.parametrize("value", ["1", "-0.1", "nan", "lots", 1.0])
def test_entropy_epsilon_outside_zero_to_one_is_refused(value: str | float) -> None:
    with pytest.raises(ConfigError, match="entropy epsilon"):
        parse_entropy_epsilon(value)


def test_run_config_checks_its_conventions() -> None:
    assert RunConfig().to_dict()["entropy_epsilon"] == 0.0
    assert RunConfig(entropy_epsilon=1e-4, similarity_measure="clark",
                     word_rows="first").to_dict()["similarity_measure"] == "clark"
    with pytest.raises(ConfigError, match="unknown similarity measure 'js': use distance or"):
        RunConfig(similarity_measure="js")
    with pytest.raises(ConfigError, match="unknown word rows 'max'"):
        RunConfig(word_rows="max")
    with pytest.raises(ConfigError, match="entropy epsilon"):
        RunConfig(entropy_epsilon=-1.0)
