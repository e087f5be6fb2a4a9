"""A survey run whose inputs and outputs are on S3 behind a proxy that throttles (503 SlowDown)."""

from __future__ import annotations

import pandas as pd
import pytest
import s3fs

from d4a_batch.config import RunConfig, SamplerConfig
from d4a_batch.pipeline.engine import ExecutionOptions, run_survey
from d4a_batch.schema import Status
from d4a_batch.survey.hats_io import open_input_catalog, read_partition
from tests.faults import FlakyS3Proxy, moto_s3

CONFIG = RunConfig(sampler=SamplerConfig(steps=2, samples=2, seed=7), fits_maps=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_on_throttling_s3_loses_nothing(ray_local, tiny_survey, tiny_prior):
    with moto_s3("survey") as s3, FlakyS3Proxy(s3.url, fail_every=3) as proxy:
        direct = s3fs.S3FileSystem(**s3.options(), skip_instance_cache=True)
        direct.put(str(tiny_survey), "survey/in", recursive=True)
        options = ExecutionOptions(batch_size=4, storage_options=s3.options(proxy.url))
        summary = run_survey(
            "s3://survey/in", "s3://survey/out-throttled", str(tiny_prior), CONFIG, options
        )
        proxy.stop()  # the checks below go to the server directly
        cat = open_input_catalog("s3://survey/in", s3.options())
        ids = [
            i
            for p in cat.partitions
            for i in read_partition(p, CONFIG.columns, ("g", "r", "i"), "", s3.options())[
                "object_id"
            ].to_pylist()
        ]
        files = sorted(direct.glob("survey/out-throttled/dataset/Norder=*/Dir=*/Npix=*.parquet"))
        df = pd.concat(pd.read_parquet(direct.open(f, "rb")) for f in files)
        n_fits = len(direct.glob("survey/out-throttled/fits/*/*.fits"))
    assert proxy.injected > 0, "the proxy injected no failure"
    assert sorted(df.object_id) == sorted(ids) and df.object_id.is_unique
    bad = df[df.status != Status.OK]
    assert bad.empty, f"errors caused by transient faults: {bad[['object_id', 'message']]}"
    assert summary.objects == len(ids) == summary.ok and summary.failed == 0
    assert n_fits == len(ids)
    print(
        f"injected {proxy.injected} of {proxy.eligible} object requests; {proxy.forwarded} forwarded"
    )
