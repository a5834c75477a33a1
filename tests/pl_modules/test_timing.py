"""What methods tell step timings: their floors (`StepFloor`) and their phases (`SemiSupervisedModule.phase`)."""

import pytest
import torch

from src.callbacks import PhaseTimer
from src.pl_modules import METHODS, MeanTeacher
from src.pl_modules.timing import StepFloor
from tests.pl_modules.method_tester import make_batch, tiny_kwargs


def test_floor_keys_round_trip():
    for floor in (StepFloor(), StepFloor((1, 1), 1), StepFloor((2,), 1, "c3head"), StepFloor((2, 2), 1, "fp")):
        assert StepFloor.from_key(floor.key) == floor
    assert StepFloor((1, 1), 1, "head").key == "1,1:1+head" and StepFloor().key == "1"


@pytest.mark.parametrize("bad", [{"passes": ()}, {"passes": (0,)}, {"eval_forwards": -1}, {"variant": "gpu"}])
def test_a_bad_floor_is_refused(bad):
    with pytest.raises(ValueError, match="StepFloor"):
        StepFloor(**bad)


def test_every_method_declares_a_floor():
    # Methods without a floor (None) show "–" in bench_step's x floor column; the suite's all have one.
    assert {name: type(cls.step_floor) for name, cls in METHODS.items()} == dict.fromkeys(METHODS, StepFloor)
    assert METHODS["cutmix"].step_floor == METHODS["mean_teacher"].step_floor == StepFloor((1, 1), 1)


def test_phases_record_nothing_without_a_recorder():
    module = MeanTeacher(**tiny_kwargs())
    assert module.phase("teacher") is module.phase("mix+aug")  # one shared no-op context
    with module.phase("teacher"):
        pass
    assert module.phase_recorder is None


def test_a_recorder_gets_each_phase_of_a_step_and_a_nested_phase_pauses_its_parent(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 6.0, 10.0])  # enter a, enter b, leave b, leave a, enter c
    monkeypatch.setattr("src.callbacks.time.perf_counter", lambda: next(clock))
    timer = PhaseTimer()
    with timer.timing("a"):
        with timer.timing("b"):
            pass
    assert timer.current == {"a": 1.0 + 3.0, "b": 2.0}
    timer.on_train_batch_end(None, None)
    assert timer.steps == [{"a": 4.0, "b": 2.0}] and timer.current == {}


def test_a_mean_teacher_step_records_its_teacher_and_its_mixing():
    module = MeanTeacher(mix_mode="cutmix", **tiny_kwargs())
    timer = PhaseTimer()
    module.phase_recorder = timer
    timer.on_train_batch_start(None, module)
    module.compute_losses(make_batch())
    assert set(timer.current) == {"teacher", "mix+aug"} and min(timer.current.values()) > 0
