"""The sampling stage as a plain class: a staged pack in, its output rows out, without Ray.

``PackSampler`` loads the prior once and turns each pack of staged objects (``survey.packs``:
one stamp size, Parquet bytes or a table) into output rows (``survey.output``). For a pack
of objects it chains::

    deconvolve (sampling.deconvolve)        posterior samples and summaries
    observed_snr, calibrated_columns        the calibrated interval columns (sampling.calibrate)
    chi2_regions (below)                    where the excess chi2 lies (sampling.residuals)
    detection_flag_inputs, flag_objects     the quality flags (survey.detection, sampling.flags)
    output_table                            the rows (survey.output)

An error pack becomes error rows; a pack whose sampling fails becomes error rows that say
why. The engine's Ray actor (``pipeline.actors.DeconvolveActor``) wraps one in a few lines;
validation, benchmarks and tests use it directly, in their own process.

Why a top-level module, not ``sampling/`` or ``pipeline/``: the stage joins the sampler
(``sampling``) with the pack and row formats (``survey``). Inside ``sampling/`` it would make
``sampling`` import ``survey`` while ``survey`` still imports ``sampling.flags`` (issue 32
item 3), a two-package circle that tests/test_layers.py forbids; inside ``pipeline/`` the
validation code that runs "the engine without Ray" would sit above the Ray engine. It never
imports Ray (tests/test_layers.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from d4a_batch.config import RunConfig
from d4a_batch.physics.operator import ObservationBatch
from d4a_batch.prior.artifact import load_prior
from d4a_batch.sampling.calibrate import calibrated_columns, observed_snr, usable_calibration
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.sampling.flags import flag_objects
from d4a_batch.sampling.residuals import chi2_localisation, normalised_residual
from d4a_batch.sampling.summaries import PosteriorSummaries, reconvolved_flux
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


class PackProgress(Protocol):
    """What a ``PackSampler`` tells of its work (the engine's: ``pipeline.progress.StepReporter``)."""

    def pack_started(self, object_ids: list[int]) -> None:
        """A pack of objects to sample; its first step begins now."""

    def step(self, i: int, x: torch.Tensor) -> None:
        """The sampler's step callback: one reverse step of every row x[R,C,N,N] of the pack."""

    def pack_finished(self, n_objects: int) -> None:
        """A pack is done (sampled, or error rows)."""


class NoProgress:
    """A ``PackProgress`` that tells no one."""

    def pack_started(self, object_ids: list[int]) -> None:
        pass

    def step(self, i: int, x: torch.Tensor) -> None:
        pass

    def pack_finished(self, n_objects: int) -> None:
        pass


class PackSampler:
    """The sampling stage: packs of staged objects -> output rows, in this process.

    ``__init__`` sets torch's threads (``torch_threads``, at most the CPUs; None: as they
    are), loads the prior artifact at ``prior_path`` once (on ``device``; None: CUDA when
    there is one, else the CPU) and refuses one whose weights differ from
    ``provenance.prior_hash``. ``config``: the run's sampler, physics and flag settings;
    ``spec``: the output's bands, stamp size, maps and kept samples; ``provenance``: the
    run's, written on every row. The calibrated interval columns come from the prior's
    calibration for ``config.sampler``, if it has one (``usable_calibration``).
    ``progress`` hears of every pack and sampler step (None: no one).
    """

    def __init__(
        self,
        prior_path: str | os.PathLike,
        config: RunConfig,
        spec: OutputSpec,
        provenance: Provenance,
        *,
        torch_threads: int | None = None,
        device: str | None = None,
        progress: PackProgress | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(max(1, min(int(torch_threads), os.cpu_count() or 1)))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.prior = load_prior(prior_path, device=device)
        if self.prior.sha256 != provenance.prior_hash:
            raise RuntimeError(
                f"prior {Path(prior_path)} has sha256 {self.prior.sha256}, the run expects "
                f"{provenance.prior_hash}: the artifact changed under the run"
            )
        self.config = config
        self.spec = spec
        self.provenance = provenance
        cfg = self.prior.config
        self.z_range = (cfg.z_min, cfg.z_max)
        # calibrated interval columns only with a calibration fitted for this sampler config
        self.calibration = usable_calibration(self.prior.calibrations, config.sampler)
        self.progress: PackProgress = NoProgress() if progress is None else progress

    def process(self, kind: str, data: bytes) -> pa.Table:
        """Output rows of one pack given as Parquet bytes (``survey.packs.make_packs``)."""
        return self.rows(kind, pack_from_bytes(data))

    def rows(self, kind: str, pack: pa.Table) -> pa.Table:
        """Output rows of one pack, one per object in pack order: ``kind`` ``KIND_ERRORS``
        (staging errors) gives error rows, any other kind samples the pack."""
        try:
            if kind == KIND_ERRORS:
                return self._table(pack)
            return self._sample(pack)
        finally:
            self.progress.pack_finished(pack.num_rows)

    def _table(
        self,
        pack: pa.Table,
        summaries: PosteriorSummaries | None = None,
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

    def _sample(self, pack: pa.Table) -> pa.Table:
        """Output rows of a pack of objects to sample."""
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
