"""Science validation on catalogs: the engine's staging and sampling stage, scored against truth.

The path is the engine's minus Ray: catalog rows (``hats_io.read_partition``) ->
``Stager.stage`` -> ``make_packs`` -> ``PackSampler.process`` (``sampling.deconvolve``
plus the output rows and flags of ``survey.output``; the engine's sampling actor wraps the
same class), run in this process. The sampler keeps every sample (``keep_samples =
samples``) so that coverage can be measured.

Per object with a known truth (the mock survey's ``truth.parquet``): PSNR/SSIM of the
posterior mean, of Richardson-Lucy and of the resampled observation against the truth
(``metrics.image_scores``, all on the model grid of the sampler), the reduced χ² of the
re-convolved mean (from the sampler) and of RL, 68/95% coverage of the core pixels in flux
space, the hallucination score, and the truth's aperture S/N (``metrics.aperture_snr`` of
the noiseless truth seen through the object's operator at its true redshift).

Longer than 400 lines: it is the one path from catalog rows to scored objects (read the
rows and the truth, stage, sample, cache packs, score against the truth and the RL
baseline, draw), and its callers (benchmark_science, calibrate_prior, real_hst_check, the
science tests) use it end to end. The seam that exists, the readers of the inputs
(``read_truth``, ``read_rows``, ``hsc_npz_rows``), is left for issue 32 item 4, which
moves the jobs' own logic into the package and will redraw these modules.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from d4a_batch.config import ColumnMap, PhysicsConfig, PriorConfig, RunConfig
from d4a_batch.mock.survey import TRUTH_FILE
from d4a_batch.pack_sampler import PackSampler, pack_observations
from d4a_batch.physics.operator import ForwardOperator, ObservationBatch, model_pixel_scale
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.schema import Col
from d4a_batch.survey.fits_io import hsc_tan_wcs, write_hsc_cutout, write_psf
from d4a_batch.survey.hats_io import (
    INPUT_PHOTOZ_HI,
    INPUT_PHOTOZ_LO,
    ORDER,
    PIXEL,
    cutout_column,
    open_input_catalog,
    psf_column,
    read_partition,
)
from d4a_batch.survey.output import OutputSpec, Provenance
from d4a_batch.survey.packs import (
    IMAGE,
    KIND_OBJECTS,
    OFFSET,
    PSF,
    SCALE,
    VALID,
    VARIANCE,
    make_packs,
    pack_arrays,
    pack_from_bytes,
)
from d4a_batch.survey.staging import StagedObject, Stager
from d4a_batch.survey.tensors import tensor_numpy
from d4a_batch.validation.baselines import (
    richardson_lucy_stamps,
    stamp_to_model,
    subtract_background,
    tune_iterations,
)
from d4a_batch.validation.metrics import (
    aperture_snr,
    core_mask,
    coverage,
    image_scores,
    psnr,
    reconvolve,
    reduced_chi2,
)
from d4a_batch.validation.samples import flux_samples

Progress = Callable[[str], None]


# --------------------------------------------------------------------------- inputs
def read_truth(survey_root: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """The mock survey's truth per object id: z_true, i_mag_true, extras, truth [C,N,N]."""
    table = pq.read_table(Path(survey_root) / TRUTH_FILE)
    images = tensor_numpy(table["truth"])
    rows = table.drop_columns(["truth"]).to_pylist()
    return {int(r["object_id"]): {**r, "truth": images[i]} for i, r in enumerate(rows)}


def read_rows(
    catalog_root: str, bands: Sequence[str], columns: ColumnMap | None = None
) -> list[dict[str, Any]]:
    """All rows of a HATS catalog under the engine's column names, sorted by object id."""
    cat = open_input_catalog(catalog_root)
    rows: list[dict[str, Any]] = []
    for part in cat.partitions:
        rows += read_partition(
            part, columns or ColumnMap(), tuple(bands), cat.healpix_column
        ).to_pylist()
    return sorted(rows, key=lambda r: int(r[Col.OBJECT_ID]))


def hsc_npz_rows(
    npz_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    bands: Sequence[str],
    photoz: float,
    centre: tuple[float, float] = (150.1, 2.2),
) -> list[dict[str, Any]]:
    """Catalog rows (engine names) of the sources in a scarlet HSC npz (images, variance,
    mask, psfs, filters, catalog x/y), written out as cutout-service and PSF-picker FITS.

    One cutout per band (the whole npz image, with a TAN WCS centred on ``centre``), one
    row per catalogued source at its pixel position, all at redshift ``photoz``.
    """
    from hats.pixel_math.spatial_index import compute_spatial_index

    data = np.load(npz_path)
    filters = [str(f) for f in data["filters"]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = data["images"].shape[-2:]
    wcs = hsc_tan_wcs(centre[0], centre[1], shape)
    uris: dict[str, tuple[str, str]] = {}
    for b in bands:
        k = filters.index(b)
        cut, psf = str(out / f"cutout_{b}.fits"), str(out / f"psf_{b}.fits")
        write_hsc_cutout(cut, data["images"][k], data["mask"][k], data["variance"][k], wcs)
        write_psf(psf, data["psfs"][k])
        uris[b] = (cut, psf)
    rows = []
    for i, src in enumerate(data["catalog"]):
        ra, dec = (float(v) for v in wcs.pixel_to_world_values(src["x"], src["y"]))
        row = {
            Col.OBJECT_ID: i,
            Col.RA: ra,
            Col.DEC: dec,
            Col.HEALPIX: int(compute_spatial_index(np.array([ra]), np.array([dec]))[0]),
            ORDER: 0,
            PIXEL: 0,
            Col.PHOTOZ: float(photoz),
            INPUT_PHOTOZ_LO: float("nan"),
            INPUT_PHOTOZ_HI: float("nan"),
        }
        for b in bands:
            row[cutout_column(b)], row[psf_column(b)] = uris[b]
        rows.append(row)
    return rows


def stage_objects(
    rows: Sequence[dict[str, Any]], catalog_root: str, prior_cfg: PriorConfig, config: RunConfig
) -> list[StagedObject]:
    """The engine's staging of catalog rows (one thread), errors kept as error records."""
    stager = Stager(catalog_root, prior_cfg, config.physics, config.staging)
    return stager.stage_rows(list(rows), threads=1)


# --------------------------------------------------------------------------- the sampler
def make_sampler(
    prior_path: str, config: RunConfig, torch_threads: int | None = 1
) -> tuple[PackSampler, OutputSpec]:
    """The engine's sampling stage (in this process) for ``config``, keeping every sample."""
    config = dataclasses.replace(
        config, sampler=dataclasses.replace(config.sampler, keep_samples=config.sampler.samples)
    )
    cfg, meta = read_prior_config(prior_path)
    spec = OutputSpec(
        bands=tuple(cfg.bands), image_size=cfg.image_size, keep_samples=config.sampler.samples
    )
    provenance = Provenance.new_run(cfg, meta, config)
    sampler = PackSampler(prior_path, config, spec, provenance, torch_threads=torch_threads)
    return sampler, spec


def run_packs(
    sampler: PackSampler,
    spec: OutputSpec,
    objs: Sequence[StagedObject],
    batch_size: int,
    progress: Progress | None = None,
) -> list[tuple[dict[str, np.ndarray], pd.DataFrame, dict[str, np.ndarray]]]:
    """Sample staged objects pack by pack: [(pack arrays, output rows without maps, maps)].

    ``maps``: the output's tensor columns as numpy arrays (``Col.MEAN_FLUX`` [B,C,N,N],
    ``Col.SAMPLES_X`` [B,S,C,N,N], ...). Only packs of staged objects are sampled (error
    records are the engine's concern); each row gets the pack's wall time ``pack_seconds``.
    """
    results = []
    for pack in make_packs(list(objs), batch_size):
        if pack["kind"] != KIND_OBJECTS:
            continue
        t0 = time.perf_counter()
        table = sampler.process(pack["kind"], pack["pack"])
        seconds = time.perf_counter() - t0
        maps = {name: tensor_numpy(table[name]) for name in spec.map_shapes()}
        df = table.drop_columns(list(maps)).to_pandas()
        df["pack_seconds"] = seconds
        results.append((pack_arrays(pack_from_bytes(pack["pack"])), df, maps))
        if progress is not None:
            progress(
                f"pack of {pack['n_objects']} objects (stamp {pack['stamp_size']}): {seconds:.1f} s"
            )
    return results


SampledPack = tuple[dict[str, np.ndarray], pd.DataFrame, dict[str, np.ndarray], dict[int, dict]]


def save_sampled_pack(
    path: str | os.PathLike,
    arrays: dict[str, np.ndarray],
    rows: pd.DataFrame,
    maps: dict[str, np.ndarray],
    truth: dict[int, dict[str, Any]],
) -> None:
    """One sampled pack of ``run_packs`` with its objects' truths, as one ``.npz`` (atomic).

    Keys: ``a__<array>`` (the pack's arrays), ``m__<map>`` (the output maps, all samples),
    ``truth`` [B,C,N,N], ``z_true`` [B], ``mag_i_true`` [B] (in the pack's object order) and
    ``rows_json`` (the output rows). ``read_sampled_pack`` reads it back.
    """
    path = Path(path)
    ids = [int(v) for v in arrays[Col.OBJECT_ID]]
    doc = {f"a__{k}": np.asarray(v) for k, v in arrays.items() if np.asarray(v).dtype != object}
    doc |= {f"m__{k}": np.asarray(v) for k, v in maps.items()}
    doc["truth"] = np.stack([truth[i]["truth"] for i in ids])
    doc["z_true"] = np.array([truth[i]["z_true"] for i in ids])
    doc["mag_i_true"] = np.array([truth[i]["i_mag_true"] for i in ids])
    doc["rows_json"] = np.array(
        rows.to_json(orient="records", default_handler=str, date_format="iso")
    )
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **doc)
    tmp.replace(path)


def read_sampled_pack(path: str | os.PathLike) -> SampledPack:
    """``(arrays, rows, maps, truth)`` of a ``save_sampled_pack`` file; ``truth`` as in
    ``read_truth`` (object id -> truth, z_true, i_mag_true) for the pack's objects."""
    with np.load(path) as f:
        arrays = {k[3:]: f[k] for k in f.files if k.startswith("a__")}
        maps = {k[3:]: f[k] for k in f.files if k.startswith("m__")}
        truths, z_true, mag = f["truth"], f["z_true"], f["mag_i_true"]
        rows = pd.read_json(io.StringIO(str(f["rows_json"])), orient="records")
    truth = {
        int(oid): {"truth": truths[i], "z_true": float(z_true[i]), "i_mag_true": float(mag[i])}
        for i, oid in enumerate(arrays[Col.OBJECT_ID])
    }
    return arrays, rows, maps, truth


# --------------------------------------------------------------------------- scoring
def tune_rl(
    objs: Sequence[StagedObject],
    truth: dict[int, dict[str, Any]],
    candidates: Sequence[int],
) -> tuple[int, dict[int, float]]:
    """Richardson-Lucy iterations with the best mean PSNR over held-out staged objects."""
    totals: dict[int, list[float]] = {int(k): [] for k in candidates}
    for o in objs:
        a = o.arrays
        _, means = tune_iterations(
            a[IMAGE][None],
            a[VALID][None].astype(bool),
            a[PSF][None],
            np.array([o.scale]),
            np.array([o.offset]),
            truth[int(o.ident[Col.OBJECT_ID])]["truth"][None],
            candidates,
            psnr,
        )
        for k, v in means.items():
            totals[k].append(v)
    means = {k: float(np.mean(v)) for k, v in totals.items()}
    return max(means, key=means.__getitem__), means


def truth_snr(
    truth: np.ndarray,
    arrays: dict[str, np.ndarray],
    i: int,
    z_true: float,
    prior_cfg: PriorConfig,
    radius_frac: float,
    physics: PhysicsConfig,
) -> float:
    """Aperture S/N of object i's noiseless truth [C,N,N] seen through its operator at z_true."""
    scale = float(model_pixel_scale(z_true, prior_cfg, physics))
    op = ForwardOperator(
        torch.as_tensor(arrays[PSF][i : i + 1], dtype=torch.float64),
        torch.tensor([scale], dtype=torch.float64),
        torch.as_tensor(arrays[OFFSET][i : i + 1], dtype=torch.float64),
        arrays[IMAGE].shape[-2:],
    )
    with torch.no_grad():
        model = op.linear(torch.as_tensor(truth[None], dtype=torch.float64))[0].numpy()
    radius = radius_frac * truth.shape[-1] * scale
    snr, _ = aperture_snr(
        model, arrays[VARIANCE][i], arrays[VALID][i].astype(bool), tuple(arrays[OFFSET][i]), radius
    )
    return snr


def score_pack(
    arrays: dict[str, np.ndarray],
    rows: pd.DataFrame,
    maps: dict[str, np.ndarray],
    truth: dict[int, dict[str, Any]],
    prior_cfg: PriorConfig,
    config: RunConfig,
    rl_iterations: int,
) -> list[dict[str, Any]]:
    """Per-object scores of one sampled pack against the truth (see the module docstring)."""
    physics, sampler = config.physics, config.sampler
    n = prior_cfg.image_size
    obs = pack_observations(arrays, dtype=torch.float64)
    scale = arrays[SCALE]
    a = prior_cfg.stretch.a
    rl, raw = baselines_for(arrays, n, rl_iterations)
    chi2_rl = reduced_chi2(rl, obs, scale)
    flux, _ = flux_samples(maps[Col.SAMPLES_X], obs, scale, a, physics.profile_ridge)
    core = core_mask(n, sampler.aperture_radius_frac)
    out = []
    for i, oid in enumerate(arrays[Col.OBJECT_ID]):
        t = truth[int(oid)]
        row = rows.iloc[i]
        if int(row[Col.OBJECT_ID]) != int(oid):
            raise ValueError("score_pack: output rows are not in pack order")
        mean = maps[Col.MEAN_FLUX][i].astype(np.float64)
        s_mean = image_scores(mean, t["truth"], a)
        s_rl = image_scores(rl[i], t["truth"], a)
        s_obs = image_scores(raw[i], t["truth"], a)
        cov = coverage(flux[i], t["truth"], mask=core)
        rec = {
            "object_id": int(oid),
            "z_true": float(t["z_true"]),
            "photoz": float(arrays[Col.PHOTOZ][i]),
            "mag_i_true": float(t["i_mag_true"]),
            "extras": t.get("extras", ""),
            "upsampling": float(1.0 / scale[i]),
            "stamp_size": int(arrays[IMAGE].shape[-1]),
            "masked_fraction": float(arrays[Col.MASKED_FRACTION][i]),
            "snr": truth_snr(
                t["truth"],
                arrays,
                i,
                float(t["z_true"]),
                prior_cfg,
                sampler.aperture_radius_frac,
                physics,
            ),
            "chi2": float(row[Col.CHI2]),
            "chi2_rl": float(chi2_rl[i]),
            "coverage68": cov[0.68],
            "coverage95": cov[0.95],
            "hallucination": float(row[Col.HALLUCINATION]),
            "variance_ratio_mean": float(row[Col.VARIANCE_RATIO_MEAN]),
            "flags": int(row[Col.FLAGS]),
            "flag_names": str(row[Col.FLAG_NAMES]),
        }
        for name, s in (("mean", s_mean), ("rl", s_rl), ("obs", s_obs)):
            for k, v in s.items():
                rec[f"{k}_{name}"] = v
        out.append(rec)
    return out


def baselines_for(
    arrays: dict[str, np.ndarray], n: int, rl_iterations: int
) -> tuple[np.ndarray, np.ndarray]:
    """(Richardson-Lucy, resampled observation) [B,C,N,N] of a pack, flux per model pixel."""
    valid = arrays[VALID].astype(bool)
    rl = richardson_lucy_stamps(arrays[IMAGE], valid, arrays[PSF], rl_iterations)
    raw = subtract_background(arrays[IMAGE], valid)
    return (
        stamp_to_model(rl, arrays[SCALE], arrays[OFFSET], n),
        stamp_to_model(raw, arrays[SCALE], arrays[OFFSET], n),
    )


# --------------------------------------------------------------------------- figures
def object_plots(folder: Path, arrays, maps, rows, scale, cfg, truth=None, k: int = 4) -> list:
    """Per-object figures (``figures.object_figure``) of a sampled pack's first k objects:
    ``arrays``/``maps``/``rows`` as ``run_packs`` returns them; returns the paths."""
    from d4a_batch.figures import object_figure  # matplotlib: only when drawing

    obs = pack_observations(arrays, dtype=torch.float64)
    flux, _ = flux_samples(
        maps[Col.SAMPLES_X][:k], head_observations(obs, k), scale[:k], cfg.stretch.a
    )
    model = reconvolve(maps[Col.MEAN_FLUX][:k], head_observations(obs, k), scale[:k])
    paths = []
    for i in range(min(k, len(rows))):
        row = rows.iloc[i]
        oid = int(row[Col.OBJECT_ID])
        notes = [f"chi2/dof {row[Col.CHI2]:.2f}", f"score {row[Col.HALLUCINATION]:.3f}",
                 f"u {row[Col.UPSAMPLING]:.2f}", f"flags {row[Col.FLAG_NAMES] or '-'}"]  # fmt: skip
        if truth is not None:
            notes.append(f"z_true {truth[oid]['z_true']:.3f}, i {truth[oid]['i_mag_true']:.2f}")
        paths.append(object_figure(
            folder / f"{oid}.png", observation=arrays[IMAGE][i], variance=arrays[VARIANCE][i],
            valid=arrays[VALID][i].astype(bool), reconvolved=model[i],
            mean_flux=maps[Col.MEAN_FLUX][i], std_flux=maps[Col.STD_FLUX][i],
            variance_ratio=maps[Col.VARIANCE_RATIO][i], samples_flux=flux[i],
            truth=None if truth is None else truth[oid]["truth"], title=f"object {oid}",
            notes=notes,
        ))  # fmt: skip
    return paths


def head_observations(obs: ObservationBatch, k: int) -> ObservationBatch:
    return ObservationBatch(obs.image[:k], obs.variance[:k], obs.valid[:k], obs.psf[:k],
                            obs.offset[:k])  # fmt: skip
