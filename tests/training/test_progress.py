"""avepipe.progress: a bar in a terminal, rate-limited log lines with rate and ETA elsewhere."""
import logging

import pytest

from avepipe import progress as P


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(P.time, "monotonic", c)
    return c


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "avepipe.progress"]


def test_log_lines_at_most_every_30_s_and_10_percent_whichever_comes_later(clock, caplog):
    with caplog.at_level(logging.INFO, logger="avepipe.progress"):
        with P.Progress(100, desc="extract vgg19", unit="video", interactive=False) as bar:
            for _ in range(100):
                clock.t += 1.0          # 1 s per video: 10% every 10 s, so time decides
                bar.update()
    lines = _lines(caplog)
    # lines at 30, 60, 90 s, then the last one; no more than the 30-s rule allows
    assert [ln.split(":")[1].split()[0] for ln in lines] == ["30/100", "60/100", "90/100", "100/100"]
    assert lines[0] == "extract vgg19: 30/100 (30%) 1.00 video/s, ETA 0:01:10"
    assert lines[-1].startswith("extract vgg19: 100/100 (100%) 1.00 video/s, 0:01:40 in all")


def test_fast_loops_are_limited_by_the_share_and_show_postfix(clock, caplog):
    with caplog.at_level(logging.INFO, logger="avepipe.progress"):
        with P.Progress(1000, desc="train", unit="batch", interactive=False) as bar:
            for i in range(1000):
                clock.t += 0.5          # 10% = 100 batches = 50 s: the share decides
                bar.update(loss=f"{1 / (i + 1):.3f}")
    lines = _lines(caplog)
    assert len(lines) == 10             # 9 at each further 10% (time allows it) + the last
    assert "[loss=0.001]" in lines[-1] and "2.00 batch/s" in lines[-1]


def test_slow_steps_show_seconds_per_unit_and_a_resumed_start(clock, caplog):
    with caplog.at_level(logging.INFO, logger="avepipe.progress"):
        bar = P.Progress(10, initial=4, desc="cace_net/full", unit="epoch", interactive=False)
        clock.t += 120.0
        bar.update(best=5)
        bar.close()
        bar.close()                     # idempotent
    lines = _lines(caplog)
    assert lines == ["cace_net/full: 5/10 (50%) 120.0 s/epoch, ETA 0:10:00 [best=5]"]


def test_nothing_to_do_still_says_so_once(clock, caplog):
    with caplog.at_level(logging.INFO, logger="avepipe.progress"):
        P.Progress(3, initial=3, desc="done already", interactive=False).close()
    assert _lines(caplog) == ["done already: 3/3 (100%)"]


def test_a_terminal_gets_a_tqdm_bar_and_no_log_lines(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="avepipe.progress"):
        with P.Progress(5, desc="bar", unit="it", interactive=True) as bar:
            for _ in range(5):
                bar.update(loss="0.1")
    assert _lines(caplog) == []
    assert "bar" in capsys.readouterr().err
