"""The sampling stage as a plain class: a staged pack in, its output rows out, without Ray.

``PackSampler`` loads the prior once and turns each pack of staged objects (``survey.packs``:
one stamp size, Parquet bytes or a table) into output rows (``survey.output``). For a pack
of objects it chains::

    pack_arrays, pack_observations          the pack decoded (below: the one decoder)
    deconvolve (sampling.deconvolve)        posterior samples and summaries, the
                                            re-convolved mean and its chi2 (once per pack)
    observed_snr, calibrated_columns        the calibrated interval columns (sampling.calibrate)
    chi2_regions                            where the excess chi2 lies (quality.regions)
    detection_flag_inputs, flag_objects     the quality flags (quality.detection, .reasons)
    output_table                            the rows (survey.output)

An error pack becomes error rows; a pack whose sampling fails becomes error rows that say
why. The engine's Ray actor (``pipeline.actors.DeconvolveActor``) wraps one in a few lines;
validation, benchmarks and tests use it directly, in their own process.
``pack_observations`` is the one decoder from a pack's arrays to the sampler's
``ObservationBatch`` (the stage, validation and the figures use it).

Why a top-level module, not ``sampling/`` or ``pipeline/``: the stage joins the sampler
(``sampling``) with the pack and row formats (``survey``) and the flags (``quality``); inside
``sampling/`` it would make the pure-torch sampler depend on the formats it does not need;
inside ``pipeline/`` the validation code that runs "the engine without Ray" would sit above
the Ray engine. It never imports Ray (tests/test_layers.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from d4a_batch.config import RunConfig
from d4a_batch.physics.operator import ObservationBatch
from d4a_batch.prior.artifact import load_prior
from d4a_batch.quality.detection import detection_flag_inputs
from d4a_batch.quality.reasons import flag_objects
from d4a_batch.quality.regions import chi2_regions
from d4a_batch.sampling.calibrate import calibrated_columns, observed_snr, usable_calibration
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.sampling.summaries import PosteriorSummaries
from d4a_batch.schema import Col
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


def pack_observations(
    arrays: Mapping[str, np.ndarray],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> ObservationBatch:
    """The observations of B staged objects from their pack arrays (``survey.packs
    .pack_arrays``, or a ``StagedObject``'s arrays with a leading axis of 1).

    ``arrays``: ``image``, ``variance`` [B,C,H,W], ``valid`` [B,C,H,W] (uint8 or bool),
    ``psf`` [B,C,P,P], ``offset`` [B,2]. A pixel is valid where the pack says so, and its
    value is finite with variance > 0 (``ObservationBatch.from_arrays``). The sampler takes
    float32 on its device; scores and figures float64 on the CPU.
    """
    return ObservationBatch.from_arrays(
        arrays[IMAGE],
        arrays[VARIANCE],
        np.asarray(arrays[VALID]).astype(bool),
        arrays[PSF],
        arrays[OFFSET],
        dtype=dtype,
        device=device,
    )


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
        fit: dict[str, np.ndarray] | None = None,
    ) -> pa.Table:
        """Output rows of a pack: flags decided by ``quality.reasons``, written by ``output``.

        ``fit``: the sampled objects' flag inputs (``_fit_inputs``; None: nothing sampled)."""
        messages = pack[Col.MESSAGE].to_pylist() if messages is None else messages
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
            obs = pack_observations(a, device=self.prior.device)
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
            calibrated = calibrated_columns(snr, summaries.std_flux, self.calibration,
                                            self.config.sampler.aperture_radius_frac)  # fmt: skip
        except Exception as e:  # a failing pack becomes error rows; the run goes on
            log.exception("sampling failed for %d objects", pack.num_rows)
            why = f"sampling failed: {type(e).__name__}: {e}"
            return self._table(pack, None, [why] * pack.num_rows)
        fit = self._fit_inputs(a, summaries)
        return self._table(pack, summaries, calibrated=calibrated, fit=fit)

    def _fit_inputs(
        self, a: dict[str, np.ndarray], summaries: PosteriorSummaries
    ) -> dict[str, np.ndarray]:
        """The flag inputs [B] of a sampled pack (``quality.reasons.flag_objects``' ``fit``):
        staging's geometry and detection measurements, the summaries' score and chi2, and
        where the excess chi2 lies (``quality.regions.chi2_regions``, on the re-convolved
        mean the chi2 was computed from; when that fails, the POOR_FIT reason goes without)."""
        n = len(a[Col.OBJECT_ID])
        regions: dict[str, np.ndarray] = {}
        try:
            regions = chi2_regions(
                a[IMAGE], a[VARIANCE], a[VALID], summaries.reconvolved, a[PSF], a[OFFSET],
                a[Col.N_OUT], a.get(NEIGHBOUR_MASK), self.config.sampler.flags.core_radius_fwhm,
            )  # fmt: skip
        except Exception:
            log.exception("locating the excess chi2 failed for %d objects", n)
        return {
            "masked_fraction": a[Col.MASKED_FRACTION],
            "upsampling": 1.0 / a[SCALE],
            "hallucination": summaries.hallucination,
            "chi2_reduced": summaries.chi2,
            **detection_flag_inputs(a, n, self.prior.config),
            **regions,
        }
