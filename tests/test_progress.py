"""Progress of long phases without a terminal, and the worker's throttled step events.

    .venv/bin/python -m pytest tests/test_progress.py -q

A fake clock decides when time passes: nothing here depends on the machine's speed.
"""

from __future__ import annotations

import json

import pytest

from harness.progress import Progress
from harness.records import EpochEvent, EpochRecord, RunKey, StepEvent
from harness.results import PROGRESS_PREFIX, parse_progress
from harness.runner import Reporter


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_without_a_terminal_one_line_at_most_every_30_s_with_an_eta():
    clock, lines = Clock(), []
    bar = Progress("generating images", 1000, "img", tty=False, write=lines.append, clock=clock)
    for done in range(1, 1001):
        clock.t = done * 0.1  # 10 images a second: 100 s in all
        bar.update_to(done)
    bar.close()
    assert lines == [
        "    generating images: 300/1,000 img (30%, about 70 s left)",
        "    generating images: 600/1,000 img (60%, about 40 s left)",
        "    generating images: 900/1,000 img (90%, about 10 s left)",
    ]


def test_a_short_phase_and_a_quiet_one_print_nothing():
    clock, lines = Clock(), []
    short = Progress("caching images", 10, "img", tty=False, write=lines.append, clock=clock)
    quiet = Progress("caching images", 10, "img", enabled=False, tty=False,
                     write=lines.append, clock=clock)
    for done in range(1, 11):
        clock.t = done * 2.9
        short.update_to(done)
        quiet.update_to(done)
    assert lines == []


def test_the_worker_sends_a_few_step_events_per_second_at_most(monkeypatch, capsys):
    from harness import worker

    clock = Clock()
    on_step = worker.step_emitter(epochs=3, first_epoch=2, clock=clock)
    for _ in range(2):
        for done in range(1, 101):
            clock.t += 1 / 64  # 64 steps a second: an event every 32 steps
            on_step(done, 100)
    events = [parse_progress(line) for line in capsys.readouterr().out.splitlines()]
    # never the last step of an epoch (the epoch's event follows it); 0.5 s after the last event
    assert [(e.epoch, e.step, e.steps) for e in events] == [
        (2, 32, 100), (2, 64, 100), (2, 96, 100), (3, 28, 100), (3, 60, 100), (3, 92, 100)]
    assert all(isinstance(e, StepEvent) and e.epochs == 3 for e in events)


def _record(epoch: int) -> EpochRecord:
    return EpochRecord(epoch=epoch, loss=0.5, accuracy=0.75, recall=0.5, precision=0.5,
                       val_loss=None, val_accuracy=None, val_recall=None, val_precision=None,
                       seconds=40.0, train_seconds=39.0, images=100)


@pytest.mark.parametrize(("quiet", "expected"), [
    (False, ["[1/1] cnn / torch / seed 0: started",
             "    epoch 1/2: 700/1,000 batch (70%, about 15 s left)",
             "    epoch 1/2: loss 0.5000 acc 0.750 (40.0 s, run ETA 40.0 s)",
             "[1/1] cnn / torch / seed 0: ok (80.0 s)"]),
    (True, ["[1/1] cnn / torch / seed 0: ok (80.0 s)"]),
])
def test_batches_of_an_epoch_in_the_log_and_quiet_keeps_one_line(monkeypatch, quiet, expected):
    from harness import progress, runner

    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    lines: list[str] = []
    reporter = Reporter(quiet=quiet, total=1, write=lines.append, tty=False)
    key = RunKey("cnn", "torch", 0)
    reporter.start(key)
    for step in range(100, 1000, 100):  # events every 5 s: one log line after 30 s
        clock.t = step / 20
        reporter.event(key, StepEvent(epoch=1, epochs=2, step=step, steps=1000))
    reporter.event(key, EpochEvent(epochs=2, record=_record(1)))
    reporter.finish(runner.RunOutcome(key, "ok", 80.0))
    assert lines == expected


def test_step_events_round_trip_as_progress_lines():
    line = PROGRESS_PREFIX + json.dumps({"event": "step", "epoch": 1, "epochs": 2, "step": 5,
                                         "steps": 9})
    assert parse_progress(line) == StepEvent(epoch=1, epochs=2, step=5, steps=9)
