"""The strategy registry: every registered strategy builds a valid config; report order."""

import pytest

from herllm.config import build_config
from herllm.errors import UserError
from herllm.strategies import (
    REFERENCE,
    STRATEGIES,
    get_strategy,
    register_strategy,
    strategy_order,
    strategy_overrides,
)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_registered_strategy_builds_a_valid_config(name):
    if STRATEGIES[name].missing:
        pytest.skip(STRATEGIES[name].missing)
    cfg = build_config(None, [*strategy_overrides(name), f"strategy={name}"])
    assert cfg.strategy == name


def test_report_order_is_reference_rows_then_registration_order():
    assert (
        strategy_order()
        == "base joint hf-peft naive replay ewc mas si lwf mer olora her her-step".split()
    )
    assert strategy_order()[: len(REFERENCE)] == list(REFERENCE)


def test_unknown_and_duplicate_names_are_clear_errors():
    with pytest.raises(UserError, match="unknown strategy 'nope'; choose one of naive, replay"):
        get_strategy("nope")
    with pytest.raises(ValueError, match="'naive' is already registered"):
        register_strategy("naive", "again")
