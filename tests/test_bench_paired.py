"""The benchmark's paired rounds (bench/bench.py): ratios are taken within each round, summarised by their median
and min–max; the order of the participants alternates; a noisy ceiling is reported. Pure logic, no servers."""
import argparse
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402


def run(name: str, rnd: int, rps: float) -> dict:
    return {"scenario": name, "round": rnd, "rps": rps, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0, "rows": 1000,
            "response_bytes": 322, "note": "", "other_load_cores": 0.0}


def test_ratio_is_the_median_of_per_round_ratios():
    # the machine halves its speed in round 2: both sides see it, so the per-round ratio stays 0.5
    rps = {"getinfo": [5000, 2500, 5200, 4800, 5000], "ceiling": [10000, 5000, 10000, 10000, 10000]}
    paired = bench.Paired(["getinfo", "ceiling"], [run(n, r, v[r]) for n, v in rps.items() for r in range(5)])
    ratio = paired.ratio("getinfo", "ceiling")
    assert ratio["rounds"] == [0.5, 0.5, 0.52, 0.48, 0.5]
    assert (ratio["median"], ratio["min"], ratio["max"]) == (0.5, 0.48, 0.52)
    # a ratio of medians would mix rounds; the per-round one does not
    assert paired.median("getinfo") == 5000 and paired.spread("ceiling") == 2.0
    summary = paired.summary()
    assert summary["rounds"] == 5 and summary["ratios"]["getinfo/ceiling"]["median"] == 0.5


class RecordingRunner:
    """Stands in for wrk: returns a fixed req/s per subject and records the order of the runs."""

    def __init__(self, rps: dict[str, float]) -> None:
        self.args = argparse.Namespace(duration=1)
        self.rps, self.calls = rps, []

    def measure(self, subject, *, warm=False, check=False, round_no=None, pair=None) -> dict:
        self.calls.append((round_no, subject.name, warm, check))
        return run(subject.name, round_no, self.rps[subject.name])


def test_paired_rounds_alternate_the_order_and_warm_up_once():
    runner = RecordingRunner({"s": 800, "ceiling": 1000, "peer": 100})
    subjects = [bench.Subject(name, None, "secret", []) for name in ("s", "ceiling", "peer")]
    paired = bench.paired_rounds(runner, subjects[0], subjects[1:], rounds=3)
    assert [(r, n) for r, n, _, _ in runner.calls] == [
        (0, "s"), (0, "ceiling"), (0, "peer"), (1, "peer"), (1, "ceiling"), (1, "s"),
        (2, "s"), (2, "ceiling"), (2, "peer")]
    assert [(n, w, c) for r, n, w, c in runner.calls if w or c] == [("s", True, True), ("ceiling", True, True),
                                                                     ("peer", True, True)]
    assert paired.ratio("s", "ceiling")["median"] == 0.8 and paired.ratio("s", "peer")["median"] == 8.0


def test_noisy_ceiling_is_reported(capsys):
    quiet = bench.Paired(["s", "ceiling"], [run("s", r, 700) for r in range(3)]
                         + [run("ceiling", r, v) for r, v in enumerate([1000, 1100, 1050])])
    out = bench.print_paired([quiet])
    assert out["ceiling_spread"] == 1.1 and not out["noisy"] and "WARNING" not in capsys.readouterr().out
    noisy = bench.Paired(["s", "ceiling"], [run("s", r, 700) for r in range(3)]
                         + [run("ceiling", r, v) for r, v in enumerate([1000, 1400, 1050])])
    out = bench.print_paired([noisy])
    text = capsys.readouterr().out
    assert out["noisy"] and "WARNING" in text and "1.40" in text
    row = next(r for r in out["table"] if r["scenario"] == "s")
    assert row["ratio_to_ceiling"]["median"] == 0.6667 and row["ratio_to_ceiling"]["min"] == 0.5
