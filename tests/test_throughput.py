"""benchmarks/throughput.py in --quick mode: every row is produced and every ratio is usable.

No speed is asserted: timings on a shared machine are noise at this size.
"""
from __future__ import annotations

import json
import math
import runpy
import statistics
from pathlib import Path

import pytest

from kdzoo import KDZooError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(SCRIPT), run_name="throughput")


def test_quick_run_has_every_row_with_finite_positive_ratios(bench, cifar_path, monkeypatch, tmp_path, capsys,
                                                              one_thread):
    monkeypatch.setenv("KDZOO_DATA", cifar_path)
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "t.json"
    result = bench["main"](["--quick", "--json", str(out)])

    rows = {r["key"]: r for r in result["rows"]}
    assert {"P1", "P2", "P3", "P4", "P5"} <= set(rows)
    for key in ("P1", "P2", "P3", "P4", "P5"):
        r = rows[key]
        for side in ("ours", "base"):
            m = r[side]
            assert len(m["samples"]) == 2, (key, side)  # QUICK: two timed windows
            assert all(math.isfinite(v) and v > 0 for v in m["samples"]), (key, side, m)
            assert m["median"] > 0 and 0 < m["peak_mb"] < 4096  # the memory bound for --quick
        assert isinstance(r["met"], bool)
    for key in ("P1", "P2", "P4", "P5"):  # speed-up, cost and utilisation ratios are positive
        assert math.isfinite(rows[key]["ratio"]) and rows[key]["ratio"] > 0, key
    assert math.isfinite(rows["P3"]["ratio"]) and rows["P3"]["ratio"] < 1  # an overhead: 1 - engine/minimal

    # The ratios are what the samples say: medians of per-round ratios.
    def paired(key, ours_over_base=True):
        o, b = rows[key]["ours"]["samples"], rows[key]["base"]["samples"]
        return statistics.median(x / y if ours_over_base else y / x for x, y in zip(o, b))

    assert rows["P1"]["ratio"] == pytest.approx(paired("P1"))
    assert rows["P2"]["ratio"] == pytest.approx(paired("P2", ours_over_base=False))  # cohort cost / separate cost
    assert rows["P3"]["ratio"] == pytest.approx(1 - paired("P3"))
    assert rows["P5"]["ratio"] == pytest.approx(paired("P5"))
    assert rows["P9"]["ratio"] == pytest.approx(paired("P9", ours_over_base=False))  # cached cost / live cost
    assert rows["P9"]["ratio"] > 0
    assert not (tmp_path / "cache" / "teacher-logits").exists()  # P9 fills a temporary cache, not the user's

    # P5 counts resnet20's forward by hand: multiply-adds of each conv (C_in * C_out * k * k * H_out * W_out)
    # and the classifier, two FLOPs each.
    macs = 3 * 16 * 9 * 32 * 32 + 6 * 16 * 16 * 9 * 32 * 32  # stem, stage 1
    macs += 16 * 32 * 9 * 16 * 16 + 16 * 32 * 16 * 16 + 5 * 32 * 32 * 9 * 16 * 16  # stage 2 (with 1x1 shortcut)
    macs += 32 * 64 * 9 * 8 * 8 + 32 * 64 * 8 * 8 + 5 * 64 * 64 * 9 * 8 * 8  # stage 3
    macs += 64 * 10  # fc
    assert result["extra"]["resnet20_forward_flops_per_image"] == pytest.approx(2 * macs, rel=1e-9)
    assert result["extra"]["anchor_num_workers_best"] in (0, 1, 2)
    assert result["memory"] and result["machine"]["torch_threads"] >= 1

    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    table = capsys.readouterr().out
    for key in ("P1", "P2", "P3", "P4", "P5"):
        assert key in table


def test_missing_data_is_a_clear_error(bench, monkeypatch):
    monkeypatch.delenv("KDZOO_DATA", raising=False)
    with pytest.raises(KDZooError, match="KDZOO_DATA is not set"):
        bench["main"](["--quick"])


def test_unknown_row_is_a_clear_error(bench, cifar_path, monkeypatch):
    monkeypatch.setenv("KDZOO_DATA", cifar_path)
    with pytest.raises(KDZooError, match="unknown rows P10"):
        bench["main"](["--quick", "--only", "P1,P10"])
