"""Progress without a terminal: plain lines at most every PLAIN_EVERY seconds, with counts, rate and ETA."""

from __future__ import annotations

from cl_flat.progress import PlainProgress, duration


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_are_spaced_and_say_count_rate_eta_and_the_end():
    clock, lines = Clock(), []
    plain = PlainProgress("examples", every=30, clock=clock, write=lines.append)
    key = plain.add_task("evaluate after t1", 100)
    for second in range(1, 51):  # 2 examples a second
        clock.now = 100 + second
        plain.advance(key, 2)
    assert lines == ["evaluate after t1: 100 examples",
                     "evaluate after t1: 60/100 examples, 2/s, ETA 20s",  # at 30 s, the first line since the start
                     "evaluate after t1: 100/100 examples, done in 50s"]


def test_a_resumed_head_start_is_not_part_of_the_rate_and_fields_are_shown():
    clock, lines = Clock(), []
    plain = PlainProgress("updates", every=10, clock=clock, write=lines.append,
                          fields=lambda values: f", loss {values['loss']:.2f}")
    key = plain.add_task("t2", 1000, loss=float("nan"))
    plain.update(key, completed=400)
    clock.now += 10
    plain.update(key, advance=20, loss=0.5)
    assert lines[-1] == "t2: 420/1000 updates, loss 0.50, 2/s, ETA 4m50s"


def test_durations_read_naturally():
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600, 7620)] == ["0s", "59s", "1m01s", "59m59s", "1h00m",
                                                                      "2h07m"]
