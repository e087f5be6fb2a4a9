"""training.record: entries merge by (step, phase), sort by CPU time, and draw."""

from __future__ import annotations

import json

from d4a_batch.training.record import add_entry, curve_figure, read_record


def _entry(step, ds, hours, fd, real=()):
    return {"step": step, "downsample": ds, "cpu_hours": hours, "frechet_distance": fd,
            "frechet_floor": 0.1, "real_hst": list(real)}  # fmt: skip


def test_entries_merge_sort_and_plot(tmp_path):
    assert read_record(tmp_path) == []
    add_entry(tmp_path, _entry(2000, 2, 1.0, 9.0))
    add_entry(tmp_path, _entry(1000, 2, 0.5, 20.0))
    entries = add_entry(tmp_path, _entry(2000, 2, 1.0, 8.0))  # the same checkpoint re-scored
    assert [(e["step"], e["frechet_distance"]) for e in entries] == [(1000, 20.0), (2000, 8.0)]
    real = [{"z": 0.3, "chi2": 2.0}, {"z": 0.8, "chi2": 3.0}]
    entries = add_entry(tmp_path, _entry(2000, 1, 1.5, 6.0, real))  # same step, next phase
    assert len(entries) == 3 and entries[-1]["downsample"] == 1
    assert json.loads((tmp_path / "record.json").read_text())["entries"] == entries
    png = curve_figure(entries, tmp_path / "curve.png")
    assert png.stat().st_size > 10_000
