"""The plain loop of the engine-vs-loop benchmark, and the benchmark's tables of it."""

from __future__ import annotations

import pyarrow.parquet as pq

from d4a_batch.config import RunConfig, SamplerConfig
from d4a_batch.schema import Col, Status
from d4a_batch.validation.engine_throughput import layouts, plain_loop
from d4a_batch.validation.throughput_sections import report
from tests.survey.conftest import tiny_prior, tiny_survey

__all__ = ["tiny_prior", "tiny_survey"]


def test_the_plain_loop_gives_every_object_one_row_and_the_tables_show_it(
    tiny_prior, tiny_survey, tmp_path
):
    config = RunConfig(sampler=SamplerConfig(steps=2, samples=2), write_maps=False)
    out = tmp_path / "loop.parquet"
    loop = plain_loop(tiny_survey, str(tiny_prior), config, batch_size=3, out=out, threads=1)
    rows = pq.read_table(out)
    assert loop["objects"] == rows.num_rows == 8 and rows[Col.OBJECT_ID].to_pylist()
    assert set(rows[Col.STATUS].to_pylist()) == {Status.OK}
    assert loop["packs"] >= 3 and loop["seconds"] > loop["staging_seconds"] > 0
    # the benchmark's engine-only report of such rows
    engine = {**loop, "chosen": "1 partitions, 8 objects in packs of <= 3, 2 actors x (...)"}
    doc = {
        "load_average_at_start": (1.0, 1.0, 1.0),
        "engine_vs_loop": {
            "sampler": {"sampler": "dds", "steps": 2, "samples": 2, "gauss_newton": 1,
                        "cg_iterations": 2},
            "batch_size": 3,
            "rows": [{"objects": 8, "loop_seconds": loop["seconds"], "engine_seconds": 1.0,
                      "loop_objects_per_s": loop["objects_per_s"], "engine_objects_per_s": 8.0,
                      "engine_over_loop": loop["seconds"], "loop": loop, "engine": engine}],
        },
    }  # fmt: skip
    text = report(doc)
    assert "| objects | loop_seconds | engine_seconds |" in text and "| 8 |" in text
    names = [lay.name for lay in layouts(2, 8)]
    assert names[0].endswith("(before)") and "split" in names[1] and "2 threads" in names[2]
