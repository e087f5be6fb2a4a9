"""A real three-node Ray cluster on this machine (``ray start``): a node dies mid-run.

Head (0 CPUs: the job's driver only) and two worker nodes (tests/cluster.py), all on
loopback with ports and temp dirs of their own (other Ray clusters run on this machine at
the same time). Catalog, cutouts and output live on moto's S3 server; the prior travels
with the job's working dir (``ray job submit --working-dir``: each node unpacks its own
copy, and the actors get its path relative to it, see ``ray_setup.node_local_path``). The
code itself is the installed package, as on a cluster built from one image.

The reference "single-node run" is the same job (the CLI, same arguments and seed) run
in this process on the tests' one-node Ray cluster while the three nodes boot. The job
then runs on the three-node cluster; once the first partition is committed, a worker
node that holds a sampling actor is killed (SIGKILL to its whole process
group), and the job, or a rerun, must finish with every object once and the reference's
values.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from d4a_batch.schema import LEDGER_DIR, REPO_ROOT, Col
from tests.cluster import Cluster, cluster_env, ray_cli_available
from tests.faults import moto_s3

STEPS, SAMPLES, SEED = 90, 2, 11  # enough steps that work is left after the first commit
# the engine's default sampler (DDS) at one Gauss-Newton iteration of 2 CG steps: this test is
# about a node dying, not the posterior (the default 3 x 10 costs ~4x as much per step)
CONFIG = {"sampler": {"gauss_newton": 1, "cg_iterations": 2}}


def _ok_partitions(fs, output: str) -> int:
    """Committed partitions in the run's ledger, read afresh at every poll.

    s3fs caches directory listings: a poll that reuses a listing made by the previous poll
    would not see (or would refuse to read, FileNotFoundError) a partition file committed
    in between. So the cache is dropped first, and a file that vanishes between the listing
    and the read (a rerun's superseded attempt) counts as not committed.
    """
    fs.invalidate_cache()
    n = 0
    for f in fs.find(f"{output}/{LEDGER_DIR}/partitions"):
        if f.endswith(".json"):
            try:
                n += json.loads(fs.cat_file(f))["status"] == "ok"
            except FileNotFoundError:
                continue
    return n


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not ray_cli_available(), reason="the `ray` command line is not installed")
def test_a_node_dies_mid_run_and_every_object_ends_once_as_on_one_node(
    ray_local, tiny_survey, tiny_prior, tmp_path
):
    s3fs = pytest.importorskip("s3fs")
    from d4a_batch.cli import deconvolve

    workdir = tmp_path / "job"
    shutil.copytree(tiny_prior, workdir / "prior")
    (workdir / "jobs").mkdir()  # the README's entrypoint, as `--working-dir .` ships it
    shutil.copy(REPO_ROOT / "jobs" / "deconvolve_survey.py", workdir / "jobs")
    config = workdir / "config.json"  # travels with the working dir, like the prior
    config.write_text(json.dumps(CONFIG))
    cluster = Cluster(cluster_env())
    t0 = time.monotonic()
    with moto_s3("survey") as s3:
        so = s3.options()
        fs = s3fs.S3FileSystem(**so)
        fs.put(str(tiny_survey), "survey/in", recursive=True)
        n_parts = len(fs.glob("survey/in/dataset/Norder=*/Dir=*/Npix=*.parquet"))
        assert n_parts >= 3

        def args(output: str, prior: str, config: str) -> list[str]:
            return ["--catalog", "s3://survey/in", "--output", output, "--prior", prior,
                    "--config", config,
                    "--steps", str(STEPS), "--samples", str(SAMPLES), "--seed", str(SEED),
                    "--batch-size", "1", "--actors", "2", "--cpus-per-actor", "1",
                    "--storage-options", json.dumps(so)]  # fmt: skip

        def job(output: str) -> list[str]:
            return ["python", "jobs/deconvolve_survey.py",
                    *args(output, "prior", "config.json")]  # fmt: skip

        try:
            cluster.start("head", 0, head=True)
            with ThreadPoolExecutor(1) as pool:  # the cluster boots while the reference runs
                # the single-node run: the same job on this process's one-node cluster
                ref_run = pool.submit(
                    deconvolve.main, args("s3://survey/ref", str(tiny_prior), str(config))
                )
                cluster.wait_for(1)  # a worker gives up on a head that has not registered yet
                cluster.start("a", 3)
                cluster.start("b", 3)
                cluster.wait_for(3)
                t_up = time.monotonic() - t0
                assert ref_run.result() == 0
            t_ref = time.monotonic() - t0
            cluster.submit("d4a-multinode-1", workdir, job("s3://survey/out"))
            # kill a worker node once the first partition is committed (mid-run)
            # the kill takes work away: the node killed holds a sampling actor of the run,
            # found while the run works (the actors are gone once it ends), so that the kill
            # follows the first commit at once
            deadline = time.monotonic() + 600
            victim = None
            while _ok_partitions(fs, "survey/out") < 1:
                state = cluster.job_status("d4a-multinode-1")
                assert state in ("RUNNING", "PENDING"), cluster.logs("d4a-multinode-1")
                assert time.monotonic() < deadline, "no partition committed in 600 s"
                victim = victim or cluster.node_holding("DeconvolveActor")
                time.sleep(0.2)
            victim = victim or cluster.node_holding("DeconvolveActor")
            assert victim is not None, "no sampling actor on a worker node"
            assert _ok_partitions(fs, "survey/out") < n_parts, "the run ended before the kill"
            cluster.kill(victim)
            t_kill = time.monotonic() - t0
            state = cluster.wait_job("d4a-multinode-1", 600)
            logs = cluster.logs("d4a-multinode-1")
            print(logs)
            reruns = 0
            if state != "SUCCEEDED":  # a rerun on the survivor finishes it
                reruns = 1
                cluster.submit("d4a-multinode-2", workdir, job("s3://survey/out"))
                state = cluster.wait_job("d4a-multinode-2", 600)
                logs = cluster.logs("d4a-multinode-2")
                print(logs)
            assert state == "SUCCEEDED"
            assert "output HATS catalog: s3://survey/out" in logs
        finally:
            cluster.stop()
        print(f"[multinode] 3 nodes up at {t_up:.0f} s, reference done at {t_ref:.0f} s, node {victim} "
              f"killed at {t_kill:.0f} s, done at {time.monotonic() - t0:.0f} s ({reruns} "
              "reruns)")  # fmt: skip
        signed = {"storage_options": so | {"anon": False}}
        ref = pd.read_parquet("s3://survey/ref/dataset", **signed).set_index(Col.OBJECT_ID)
        out = pd.read_parquet("s3://survey/out/dataset", **signed)
    # every object exactly once
    assert out[Col.OBJECT_ID].is_unique and sorted(out[Col.OBJECT_ID]) == sorted(ref.index)
    out = out.set_index(Col.OBJECT_ID).loc[ref.index]
    # placement does not change results: per-object seeds
    assert (out[Col.STATUS] == ref[Col.STATUS]).all()
    for col in (Col.CHI2, "flux_i", Col.HALLUCINATION):
        np.testing.assert_allclose(out[col].to_numpy(), ref[col].to_numpy(), rtol=1e-4)
