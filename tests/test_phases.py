"""Phase timing and the counting progress bars of hwtools.train.phases."""
from hwtools.train.phases import PhaseTimer, counting, progress


def test_phases_add_up_in_contract_order(monkeypatch):
    from hwtools.train import phases

    clock = iter([0.0, 2.0, 2.0, 3.0, 10.0, 14.0, 20.0, 21.5])  # the times each perf_counter() call reads
    monkeypatch.setattr(phases.time, "perf_counter", lambda: next(clock))
    timer = PhaseTimer()
    timer.begin("train")  # 0
    timer.begin("load")  # train 0 -> 2; load from 2
    timer.end()  # load 2 -> 3
    timer.end()  # nothing runs: no clock read
    with timer("train"):  # a repeated phase adds to its time: 10 -> 14
        pass
    timer.begin("save")  # 20
    assert timer.as_dict() == {"load": 1.0, "train": 6.0, "save": 1.5}  # ends save at 21.5, in contract order
    assert timer.line() == "phases (s): load 1.0, train 6.0, save 1.5 (total 8.5)"


def test_counting_ticks_the_bar_once_per_call(capsys):
    bar = progress(3, "test loss", "batches")
    fn = counting(lambda a, b=1: a + b, bar)
    assert [fn(1), fn(2, b=3), fn(0)] == [2, 5, 1]
    assert bar.n == 3
    bar.close()
    assert "test loss: 100%" in capsys.readouterr().err
    silent = progress(2, "x", "batches", enabled=False)
    counting(lambda: None, silent)()
    silent.close()
