"""The one validation layer: annotated types are the schema; refusals carry key, problem and fix."""

from typing import Literal

import pytest

from lmlab.config.schema import IncreasingInts, PositiveInt, Probability, Seed, check_arguments, check_value, conforms
from lmlab.errors import ConfigError


@pytest.mark.parametrize(
    "value, hint, fits",
    [
        (3, PositiveInt, True), (0, PositiveInt, False), (True, PositiveInt, False), (2.0, PositiveInt, False),
        (0.5, Probability, True), (1, Probability, False), (None, PositiveInt | None, True),
        ("full", Literal["full", "adaptive"], True), ("half", Literal["full", "adaptive"], False),
        ([2, 5, 9], IncreasingInts, True), ([5, 2], IncreasingInts, False), ([], IncreasingInts, False),
        (2**32, Seed, False), ({"_target_": "os.system"}, PositiveInt, False),
    ],
)  # fmt: skip
def test_values_conform_to_their_annotations(value, hint, fits):
    assert conforms(value, hint) is fits


def test_a_refusal_carries_its_parts_as_fields():
    with pytest.raises(ConfigError) as err:
        check_value("model.dropout", 1.5, Probability)
    assert err.value.key == "model.dropout"
    assert err.value.problem == "model.dropout=1.5 is invalid: it must be a number in [0, 1)"
    assert err.value.fix == "Fix it with model.dropout=VALUE on the command line or in your config."
    assert str(err.value) == f"{err.value.problem}. {err.value.fix}"


def test_arguments_are_checked_against_a_signature():
    def build(size: PositiveInt, rate: Probability = 0.1) -> None: ...

    check_arguments(build, {"size": 3, "rate": 0.5, "_target_": "x"}, "thing")
    with pytest.raises(ConfigError, match=r"thing.sise is not a setting of build; valid keys: size, rate"):
        check_arguments(build, {"sise": 3}, "thing")
    with pytest.raises(ConfigError, match=r"thing.rate=2 is invalid"):
        check_arguments(build, {"size": 3, "rate": 2}, "thing")


def test_a_key_that_moved_is_named_with_its_new_name():
    from lmlab.config import moved_key

    assert moved_key(["model=gru", "trainer.max_time_s=900"]) == (
        "trainer.max_time_s is now hooks.time_budget.max_time_s (the hooks own their options): "
        "use hooks.time_budget.max_time_s=900"
    )
    assert moved_key(["+trainer.resume=/tmp/last.pt"]).startswith("trainer.resume is now hooks.checkpoint.resume")
    assert moved_key(["hooks.checkpoint.resume=null", "trainer.epochs=3", "trainer.progress"]) is None
