"""EveryNValidations: the validation counter TextSamples and ToolCallEval share."""

from callbacks.every_n import EveryNValidations
from callbacks.text_samples import TextSamples
from callbacks.tool_call_eval import ToolCallEval


class Trainer:
    sanity_checking = False


def test_every_n_validations_skips_the_sanity_check_and_survives_a_resume():
    for make in (lambda: TextSamples(every_n_validations=3), lambda: ToolCallEval(every_n_validations=3)):
        cb = make()
        Trainer.sanity_checking = True
        assert not cb._every.due(Trainer)
        Trainer.sanity_checking = False
        assert [cb._every.due(Trainer) for _ in range(2)] == [False, False]
        resumed = make()
        resumed.load_state_dict(cb.state_dict())
        assert [resumed._every.due(Trainer) for _ in range(4)] == [True, False, False, True]


def test_n_below_one_acts_at_every_validation():
    every = EveryNValidations(0)
    assert [every.due(Trainer) for _ in range(3)] == [True, True, True]
