"""The sampling actor: loads the prior once, turns packs of staged objects into output rows."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from d4a_batch.config import RunConfig, from_dict
from d4a_batch.physics.operator import ObservationBatch
from d4a_batch.sampling.calibrate import calibrated_columns, observed_snr, usable_calibration
from d4a_batch.sampling.flags import flag_objects
from d4a_batch.sampling.residuals import chi2_localisation, normalised_residual
from d4a_batch.sampling.summaries import reconvolved_flux
from d4a_batch.schema import Col
from d4a_batch.survey.detection import detection_flag_inputs, psf_fwhm_pixels
from d4a_batch.survey.hats_io import INPUT_PHOTOZ_HI, INPUT_PHOTOZ_LO
from d4a_batch.survey.output import OutputSpec, Provenance, output_table
from d4a_batch.survey.packs import (
    IMAGE,
    KIND_ERRORS,
    NEIGHBOUR_MASK,
    NOISE_NOTE,
    OFFSET,
    PSF,
    PSF_CENTROID,
    PSF_CROP_LOSS,
    PSF_SUM,
    SCALE,
    VALID,
    VARIANCE,
    pack_arrays,
    pack_from_bytes,
)
from d4a_batch.survey.tensors import tensor_numpy

log = logging.getLogger(__name__)


class DeconvolveActor:
    """Ray Data callable class: ``{pack_id, kind, stamp_size, n_objects, pack}`` rows -> output rows.

    ``__init__`` loads the prior artifact from ``prior_path`` (on CUDA when the actor
    has a GPU, else on CPU with ``torch_threads`` threads). ``__call__`` runs
    ``sampling.deconvolve`` on each pack of staged objects (all of one stamp size) and
    passes error records through; a pack whose sampling fails becomes error rows.
    ``progress``: the run's ``pipeline.progress.ProgressBoard`` actor (None: no reports),
    told of every sampler step and finished pack.
    """

    def __init__(
        self,
        prior_path: str,
        run_config: dict[str, Any],
        spec: OutputSpec,
        provenance: Provenance,
        torch_threads: int | None = None,
        progress: Any = None,
    ) -> None:
        import torch

        from d4a_batch.pipeline.progress import StepReporter
        from d4a_batch.prior.artifact import load_prior

        if torch_threads:
            torch.set_num_threads(max(1, min(int(torch_threads), os.cpu_count() or 1)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.prior = load_prior(prior_path, device=device)
        if self.prior.sha256 != provenance.prior_hash:
            raise RuntimeError(
                f"prior {prior_path} has sha256 {self.prior.sha256}, the run expects "
                f"{provenance.prior_hash}: the artifact changed under the run"
            )
        self.config: RunConfig = from_dict(RunConfig, run_config)
        self.spec = spec
        self.provenance = provenance
        cfg = self.prior.config
        self.z_range = (cfg.z_min, cfg.z_max)
        # calibrated interval columns only with a calibration fitted for this sampler config
        self.calibration = usable_calibration(self.prior.calibrations, self.config.sampler)
        # the sampler's steps, reported to the run's progress board (pipeline/progress.py)
        sampler = self.config.sampler
        self.progress = StepReporter(progress, sampler.samples, sampler.steps)

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [
            self.process(kind, pack)
            for kind, pack in zip(batch["kind"].to_pylist(), batch["pack"].to_pylist())
        ]
        return pa.concat_tables(tables)

    def _table(
        self,
        pack: pa.Table,
        summaries=None,
        messages: list[str | None] | None = None,
        calibrated: dict[str, np.ndarray] | None = None,
        regions: dict[str, np.ndarray] | None = None,
    ) -> pa.Table:
        """Output rows of a pack: flags decided by ``sampling.flags``, written by ``output``.

        ``regions``: where each object's excess chi2 lies (``chi2_regions``)."""
        messages = pack[Col.MESSAGE].to_pylist() if messages is None else messages
        fit = None
        if summaries is not None:
            fit = {
                "masked_fraction": pack[Col.MASKED_FRACTION].to_numpy(),
                "upsampling": 1.0 / pack[SCALE].to_numpy(),
                "hallucination": summaries.hallucination,
                "chi2_reduced": summaries.chi2,
                **detection_flag_inputs(pack, self.prior.config),
                **(regions or {}),
            }
        flags = flag_objects(
            self.config.sampler.flags,
            z_range=self.z_range,
            bands=self.spec.bands,
            photoz=pack[Col.PHOTOZ].to_numpy(),
            psf_sum=tensor_numpy(pack[PSF_SUM]),
            psf_centroid_offset=tensor_numpy(pack[PSF_CENTROID]),
            errors=messages,
            fit=fit,
            noise_notes=(pack[NOISE_NOTE].to_pylist() if NOISE_NOTE in pack.column_names else None),
            psf_crop_loss=(
                tensor_numpy(pack[PSF_CROP_LOSS]) if PSF_CROP_LOSS in pack.column_names else None
            ),
        )
        return output_table(
            pack, summaries, flags, self.spec, self.provenance, messages, calibrated=calibrated
        )

    def process(self, kind: str, data: bytes) -> pa.Table:
        """Output rows of one pack (Parquet bytes)."""
        pack = pack_from_bytes(data)
        try:
            if kind == KIND_ERRORS:
                return self._table(pack)
            return self._sample(pack)
        finally:
            self.progress.pack_finished(pack.num_rows)

    def _sample(self, pack: pa.Table) -> pa.Table:
        """Output rows of a pack of objects to sample."""
        from d4a_batch.sampling.deconvolve import deconvolve

        a = pack_arrays(pack)
        self.progress.pack_started(a[Col.OBJECT_ID].tolist())
        try:
            obs = ObservationBatch.from_arrays(
                a[IMAGE],
                a[VARIANCE],
                a[VALID].astype(bool),
                a[PSF],
                a[OFFSET],
                device=self.prior.device,
            )
            summaries = deconvolve(
                obs,
                a[Col.PHOTOZ],
                self.prior,
                self.config.sampler,
                a[Col.OBJECT_ID].tolist(),
                physics=self.config.physics,
                photoz_err=np.stack([a[INPUT_PHOTOZ_LO], a[INPUT_PHOTOZ_HI]], axis=1),
                callback=self.progress.step,
            )
            cfg = self.prior.config
            snr = observed_snr(
                obs, summaries.beta, a[SCALE], self.config.sampler.aperture_radius_frac,
                cfg.image_size,
            )  # fmt: skip
            calibrated = calibrated_columns(snr, summaries.std_flux, self.calibration)
        except Exception as e:  # a failing pack becomes error rows; the run goes on
            log.exception("sampling failed for %d objects", pack.num_rows)
            why = f"sampling failed: {type(e).__name__}: {e}"
            return self._table(pack, None, [why] * pack.num_rows)
        try:  # a refinement of the POOR_FIT reason: without it, the flags stay as they are
            regions = chi2_regions(pack, a, summaries.mean_flux, self.config.sampler.flags)
        except Exception:
            log.exception("locating the excess chi2 failed for %d objects", pack.num_rows)
            regions = None
        return self._table(pack, summaries, calibrated=calibrated, regions=regions)


def chi2_regions(pack: pa.Table, a: dict[str, np.ndarray], mean_flux: np.ndarray, thresholds):
    """Where the excess chi2 of each object of a pack lies (``sampling.residuals``):
    {"chi2_core", "chi2_neighbours", "chi2_footprint", "chi2_outside"} arrays [B].

    ``a``: the pack's arrays (``pack_arrays``); ``mean_flux[B,C,N,N]``: the posterior mean
    flux. The residual/σ is that of the figures (``normalised_residual`` of the re-convolved
    mean, on CPU in float64); the core's radius scales with the widest band's PSF FWHM.
    """
    obs = ObservationBatch.from_arrays(
        a[IMAGE], a[VARIANCE], a[VALID].astype(bool), a[PSF], a[OFFSET], dtype=torch.float64
    )
    model = reconvolved_flux(np.asarray(mean_flux, np.float64), obs, a[SCALE])
    residual = normalised_residual(a[IMAGE], model, a[VARIANCE], obs.valid.numpy())
    fwhm = np.array([max(psf_fwhm_pixels(p) for p in psfs) for psfs in a[PSF]])
    nm = (
        tensor_numpy(pack[NEIGHBOUR_MASK]).astype(bool)
        if NEIGHBOUR_MASK in pack.column_names
        else None
    )
    return chi2_localisation(
        residual, a[OFFSET], fwhm, pack[Col.N_OUT].to_numpy(), nm,
        thresholds.core_radius_fwhm,
    )  # fmt: skip


def actor_resources(
    cluster: dict[str, float],
    actors: int | None,
    gpus_per_actor: float | None,
    cpus_per_actor: float | None,
    task_cpus: float,
    max_packs: int | None = None,
) -> tuple[int, float, float]:
    """(actors, cpus per actor, gpus per actor) for a cluster's resources.

    ``max_packs``: an upper bound on the run's useful actors (its objects / batch size):
    with ``actors`` None, no more actors are started than that, each keeping the CPU share
    (and torch threads) it would have had, so a small run (a rerun of a few objects, a test
    survey) does not start a process per CPU (each imports torch and loads the prior) that
    would get no pack.

    With GPUs: one actor per GPU, one GPU and one CPU each. Without: about one
    single-threaded actor per CPU, sharing the CPUs minus a headroom of
    max(2 task slots, 10 %), because actors that hold every CPU leave the
    read/stage/write tasks unscheduled and the dataset waits forever (DESIGN.md
    section 5). Single-threaded actors, because torch's thread pools slow down many
    times over when the cores are shared (measured: 218 ms vs 36 ms per image for the
    demo UNet, 2 threads vs 1, on a loaded 2-core machine).
    """
    n_cpu = float(cluster.get("CPU", 1.0))
    n_gpu = float(cluster.get("GPU", 0.0))
    gpus = (1.0 if n_gpu >= 1 else 0.0) if gpus_per_actor is None else float(gpus_per_actor)
    headroom = max(2 * task_cpus, 0.1 * n_cpu)
    auto = actors is None
    if actors is None:
        actors = max(1, int(n_gpu // gpus)) if gpus > 0 else max(1, round(n_cpu - headroom))
    if cpus_per_actor is None:
        cpus_per_actor = 1.0 if gpus > 0 else max(0.25, (n_cpu - headroom) / actors)
    if actors * cpus_per_actor > n_cpu - task_cpus + 1e-9:
        raise ValueError(
            f"{actors} actors x {cpus_per_actor} CPUs leave no CPU for the read/stage/write "
            f"tasks on a cluster of {n_cpu:g} CPUs"
        )
    if gpus > 0 and actors * gpus > n_gpu + 1e-9:
        raise ValueError(f"{actors} actors x {gpus} GPUs exceed the cluster's {n_gpu:g} GPUs")
    if auto and max_packs is not None:
        actors = max(1, min(actors, int(max_packs)))
    return int(actors), float(cpus_per_actor), gpus


def split_packs(objects: int | None, batch_size: int, actors: int) -> int:
    """Objects per pack for a run of ``objects`` on ``actors`` sampling actors.

    ``batch_size`` unless the run has fewer objects than ``actors`` full packs: then packs
    of ceil(objects / actors), so that every actor gets a pack (5 objects on 2 CPU actors:
    packs of 3 and 2 instead of one pack of 5 on one actor while the other CPU idles;
    measured in docs/HISTORY.md, issue 30). None (not known: staged packs): ``batch_size``.
    """
    batch_size = max(1, int(batch_size))
    if objects is None or objects <= 0 or objects >= actors * batch_size:
        return batch_size
    return max(1, -(-int(objects) // max(1, int(actors))))


def torch_threads_for(cpus_per_actor: float) -> int:
    """Torch threads of a CPU actor: its whole CPUs (a share of 1.5 gets 1), at least 1."""
    return max(1, math.floor(cpus_per_actor + 0.25))
