"""A mock HSC survey in the COSMOS field: a real HATS catalog plus cutout and PSF FITS files.

Layout of a survey folder (the HATS catalog root)::

    hats.properties, partition_info.csv, dataset/Norder=k/Dir=d/Npix=p.parquet, ...
    cutouts/{band}/{object_id}.fits   HSC cutout-service files (IMAGE, MASK, VARIANCE)
    psfs/{band}/{object_id}.fits      PSF-picker files (43x43)
    truth.parquet                     per object: true z, truth image [C,N,N] (counts per
                                      model pixel at the prior's kpc/pixel), what was added,
                                      its neighbour / larger-than-field / image-only role
    mock_survey.json                  the MockSurveyConfig it was built from

The catalog uses HSC PDR3 column names (``object_id``, ``ra``, ``dec``,
``photoz_best``, ``photoz_err68_min/max``, ``{band}_cmodel_mag``...) and the
URI columns ``{band}_cutout_uri`` / ``{band}_psf_uri``. URIs are relative to the
catalog root by default (the folder can move, e.g. to S3, as a whole); with
``uri_root`` set they are absolute (``uri_root/cutouts/...``, any fsspec URL).

Every galaxy is a GalSim mock (``mock.galaxies``) drawn at the prior's
kpc/pixel and degraded with the physics operator (area-overlap resampling to
0.168''/pixel, then the PSF), exactly the forward model inference uses. Noise
follows HSC coadds: Gaussian with the VARIANCE plane = sky + source/gain.
Everything is deterministic given ``MockSurveyConfig.seed``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import galsim
import lsdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from astropy.wcs import WCS

from d4a_batch.config import PhysicsConfig, PriorConfig, from_dict, to_dict
from d4a_batch.mock.galaxies import draw_galaxy, sample_params
from d4a_batch.mock.observe import INV_GAIN, SKY_VARIANCE, hsc_variance
from d4a_batch.physics.operator import ForwardOperator, model_pixel_scale
from d4a_batch.survey.fits_io import HSC_MASK_PLANES, PSF_SIZE, write_hsc_cutout, write_psf
from d4a_batch.survey.storage import join_uri
from d4a_batch.survey.tensors import tensor_array

COSMOS_CENTRE = (150.1, 2.2)  # deg
MEDIAN_SEEING = {"g": 0.80, "r": 0.72, "i": 0.62}  # arcsec FWHM
SATURATION = 1500.0  # counts per pixel above which a coadd pixel is SAT (and interpolated)
# the demo survey's share of what real cutouts have (MockSurveyConfig fields)
DEMO_REAL_DATA_MIX = {"overlap_fraction": 0.06, "large_fraction": 0.06, "image_only_fraction": 0.1}
TRUTH_FILE = "truth.parquet"
CONFIG_FILE = "mock_survey.json"


@dataclass(frozen=True)
class MockSurveyConfig:
    """What a mock survey holds. Sizes in HSC pixels, angles in degrees unless named."""

    n_objects: int = 32
    seed: int = 0
    bands: tuple[str, ...] = ("g", "r", "i")
    kpc_per_pixel: float = 0.5  # the prior's physical scale
    n_model: int = 64  # the prior's image side
    # galaxy population (mock.galaxies.sample_params): "smooth" (bulge + disk + knots) or
    # "realistic" (arms, bars, dust; what the hsc-64 prior is trained on); the demo uses
    # its prior's
    mock_structure: str = "smooth"
    field_radius_deg: float = 0.6  # objects uniform in a square of this half-side
    z_range: tuple[float, float] = (0.25, 1.0)
    i_mag_range: tuple[float, float] = (20.0, 23.5)
    cutout_size: int = 112
    neighbour_fraction: float = 0.3  # stamps with one or two neighbouring galaxies (10-30 px)
    # what real cutouts also have (issue 11), off by default (calibration and benchmark
    # mocks stay as they were); the demo turns them on (``DEMO_REAL_DATA_MIX``). Roles are
    # drawn per object from their own random stream, so the other objects do not change
    overlap_fraction: float = 0.0  # a neighbour 6-9 px away whose light overlaps the target
    large_fraction: float = 0.0  # galaxies large_factor x larger: they overflow the field
    large_factor: float = 5.0
    image_only_fraction: float = 0.0  # cutouts written "image only" (MASK, VARIANCE empty)
    star_fraction: float = 0.1  # stamps with a bright (saturated) star nearby
    cr_fraction: float = 0.3  # stamps with an interpolated cosmic ray (INTRP|CR)
    bad_column_fraction: float = 0.1  # stamps with a BAD column
    seeing_variation: float = 0.15  # relative amplitude of the seeing pattern over the field
    partition_rows: int | None = None  # HATS partition threshold; None: about n_objects / 2
    catalog_name: str = "mock_hsc_cosmos"


def seeing_fwhm(band: str, ra: float, dec: float, cfg: MockSurveyConfig) -> float:
    """Seeing FWHM (arcsec) at (ra, dec): the band's median times a smooth pattern over the field."""
    ra0, dec0 = COSMOS_CENTRE
    k = math.pi / (2 * cfg.field_radius_deg)
    pattern = math.sin(k * (ra - ra0) + 0.3) * math.cos(k * (dec - dec0) - 0.2)
    return MEDIAN_SEEING[band] * (1.0 + cfg.seeing_variation * pattern)


def draw_psf(fwhm_arcsec: float, e1: float, e2: float, size: int = PSF_SIZE) -> np.ndarray:
    """Pixel-convolved Moffat (beta 3.5) PSF [size, size] at 0.168''/pixel, centre pixel size//2, sum 1."""
    psf = galsim.Moffat(beta=3.5, fwhm=fwhm_arcsec).shear(e1=e1, e2=e2)
    img = psf.drawImage(nx=size, ny=size, scale=PhysicsConfig().hsc_pixel_arcsec).array
    return (img / img.sum()).astype(np.float64)


def tract_wcs() -> WCS:
    """A tract-like TAN WCS over the COSMOS field at 0.168''/pixel (x = -RA)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(COSMOS_CENTRE)
    w.wcs.crpix = [18000.5, 18000.5]
    pix = PhysicsConfig().hsc_pixel_arcsec / 3600.0
    w.wcs.cd = [[-pix, 0.0], [0.0, pix]]
    w.wcs.cunit = ["deg", "deg"]
    return w


def _render(
    flux: np.ndarray, psf: np.ndarray, scale: float, offset: tuple[float, float], size: int
) -> np.ndarray:
    """PSF ⊛ R(flux): flux[C,N,N] per model pixel -> counts [C,size,size] with the physics operator."""
    op = ForwardOperator(
        torch.as_tensor(psf[None], dtype=torch.float64),
        torch.tensor([scale], dtype=torch.float64),
        torch.tensor([offset], dtype=torch.float64),
        (size, size),
    )
    return op.linear(torch.as_tensor(flux[None], dtype=torch.float64))[0].numpy()


def _scale_to_mag(img: np.ndarray, band_index: int, mag: float, zp: float) -> np.ndarray:
    return img * (10 ** (-0.4 * (mag - zp)) / float(img[band_index].sum()))


def _galaxy(rng: np.random.Generator, cfg: MockSurveyConfig, mag_i: float) -> np.ndarray:
    params = sample_params(rng, 1, cfg.mock_structure)[0]
    img = draw_galaxy(params, cfg.kpc_per_pixel, cfg.n_model, cfg.bands).astype(np.float64)
    return _scale_to_mag(img, cfg.bands.index("i") if "i" in cfg.bands else -1, mag_i, 27.0)


def _z_scale(z: float, cfg: MockSurveyConfig) -> float:
    prior = PriorConfig(kpc_per_pixel=cfg.kpc_per_pixel, image_size=cfg.n_model)
    return float(model_pixel_scale(z, prior))


def _make_object(k: int, ra: float, dec: float, cfg: MockSurveyConfig, tract: WCS) -> dict:
    """Truth, cutouts [C,S,S] (image, mask, variance), PSFs and WCS of object k."""
    rng = np.random.default_rng([cfg.seed, k])
    roles = np.random.default_rng([cfg.seed, k, 2])  # issue-11 roles: their own stream
    u_role = float(roles.uniform())
    large = u_role < cfg.large_fraction
    overlap = cfg.large_fraction <= u_role < cfg.large_fraction + cfg.overlap_fraction
    image_only = float(roles.uniform()) < cfg.image_only_fraction
    zp = PhysicsConfig().zeropoint_ab
    size, bands = cfg.cutout_size, cfg.bands
    z = float(rng.uniform(*cfg.z_range))
    mag_i = float(rng.uniform(*cfg.i_mag_range))
    if large:  # the galaxy drawn at 1/f of the pixel scale on an f-times wider grid, read at
        # the prior's scale: f times larger, on a grid f times the field; truth = its centre
        f = round(cfg.large_factor)
        wide_cfg = dataclasses.replace(cfg, kpc_per_pixel=cfg.kpc_per_pixel / f,
                                       n_model=cfg.n_model * f)  # fmt: skip
        wide = _galaxy(rng, wide_cfg, mag_i)
        lo = (wide.shape[-1] - cfg.n_model) // 2
        truth = wide[:, lo : lo + cfg.n_model, lo : lo + cfg.n_model]
    else:
        wide = truth = _galaxy(rng, cfg, mag_i)  # [C,N,N] counts per model pixel
    # cutout grid: the tract's pixels around the object, object near the centre
    x, y = (float(v) for v in tract.world_to_pixel_values(ra, dec))  # 0-based pixel centres
    x0, y0 = math.floor(x + 0.5) - size // 2, math.floor(y + 0.5) - size // 2
    wcs = tract.deepcopy()
    wcs.wcs.crpix = [tract.wcs.crpix[0] - x0, tract.wcs.crpix[1] - y0]
    centre = (y - y0 + 0.5 - size / 2, x - x0 + 0.5 - size / 2)  # object offset, HSC pixels
    e1, e2 = 0.03 * math.cos(3 * ra), 0.03 * math.sin(5 * dec)
    fwhm = [seeing_fwhm(b, ra, dec, cfg) for b in bands]
    psf = np.stack([draw_psf(f, e1, e2) for f in fwhm])
    model = _render(wide, psf, _z_scale(z, cfg), centre, size)
    extras: list[str] = []
    outside = 1.0 - float(truth.sum() / wide.sum())
    neighbour_sep = math.nan
    if large:
        extras.append(f"larger than the field: {100 * outside:.0f} % of the flux outside")
    if overlap:
        r, phi = roles.uniform(6, 9), roles.uniform(0, 2 * math.pi)
        off = (centre[0] + r * math.sin(phi), centre[1] + r * math.cos(phi))
        zn = float(roles.uniform(*cfg.z_range))
        neighbour = _galaxy(roles, cfg, mag_i + float(roles.uniform(-0.5, 1.0)))
        model += _render(neighbour, psf, _z_scale(zn, cfg), off, size)
        neighbour_sep = float(r)
        extras.append(f"overlapping galaxy z={zn:.3f} at dy={off[0]:.1f} dx={off[1]:.1f}")
    if rng.uniform() < cfg.neighbour_fraction:
        for _ in range(int(rng.integers(1, 3))):
            r, phi = rng.uniform(10, 30), rng.uniform(0, 2 * math.pi)
            off = (centre[0] + r * math.sin(phi), centre[1] + r * math.cos(phi))
            zn = float(rng.uniform(*cfg.z_range))
            neighbour = _galaxy(rng, cfg, mag_i + float(rng.uniform(-1.0, 1.5)))
            model += _render(neighbour, psf, _z_scale(zn, cfg), off, size)
            neighbour_sep = float(np.nanmin([neighbour_sep, r]))
            extras.append(f"galaxy z={zn:.3f} at dy={off[0]:.1f} dx={off[1]:.1f}")
    sat = np.zeros((size, size), bool)
    if rng.uniform() < cfg.star_fraction:
        r, phi = rng.uniform(15, 28), rng.uniform(0, 2 * math.pi)
        off = (centre[0] + r * math.sin(phi), centre[1] + r * math.cos(phi))
        mag_star = float(rng.uniform(14.0, 16.0))
        colour = np.array([0.5, 0.1, 0.0][: len(bands)])
        star = np.zeros((len(bands), 1, 1))
        star[:, 0, 0] = 10 ** (-0.4 * (mag_star + colour - zp))
        model += _render(star, psf, 1.0, off, size)
        sat = (model > SATURATION).any(0)
        extras.append(f"star mag={mag_star:.2f} at dy={off[0]:.1f} dx={off[1]:.1f}")
    image = np.empty_like(model)
    variance = np.empty_like(model)
    mask = np.zeros(model.shape, np.int32)
    bit = {n: np.int32(1 << b) for n, b in HSC_MASK_PLANES.items()}
    for c, b in enumerate(bands):
        var = hsc_variance(model[c : c + 1], [b])[0]
        background = rng.uniform(-0.5, 0.5) * math.sqrt(SKY_VARIANCE[b])
        image[c] = model[c] + background + rng.standard_normal(model[c].shape) * np.sqrt(var)
        variance[c] = var
        mask[c][model[c] > 2 * math.sqrt(SKY_VARIANCE[b])] |= bit["DETECTED"]
    if sat.any():  # coadds interpolate saturated cores: smooth, useless values, flagged
        image[:, sat] = SATURATION
        mask[:, sat] |= bit["SAT"] | bit["INTRP"]
    if rng.uniform() < cfg.cr_fraction:  # a short interpolated cosmic-ray track in one band
        c = int(rng.integers(len(bands)))
        length, angle = int(rng.integers(4, 12)), rng.uniform(0, math.pi)
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        t = np.arange(length)
        yy = np.clip((cy + t * math.sin(angle)).astype(int), 0, size - 1)
        xx = np.clip((cx + t * math.cos(angle)).astype(int), 0, size - 1)
        image[c, yy, xx] += rng.uniform(0.5, 3.0, length)  # imperfect interpolation residual
        mask[c, yy, xx] |= bit["CR"] | bit["INTRP"]
        extras.append(f"cosmic ray in {bands[c]}")
    if rng.uniform() < cfg.bad_column_fraction:
        col = int(rng.integers(size // 4, 3 * size // 4))
        image[:, :, col] = rng.uniform(-50, 50)
        mask[:, :, col] |= bit["BAD"]
        extras.append(f"bad column x={col}")
    return {
        "z": z,
        "mag_i": mag_i,
        "truth": truth.astype(np.float32),
        "image": image.astype(np.float32),
        "variance": variance.astype(np.float32),
        "mask": mask,
        "psf": psf,
        "wcs": wcs,
        "seeing": fwhm,
        "offset": centre,
        "extras": "; ".join(extras),
        "neighbour_sep": neighbour_sep,
        "overlap": overlap,
        "large": large,
        "flux_outside_field": outside,
        "image_only": image_only,
    }


def _cmodel_mags(obj: dict, bands: tuple[str, ...], rng: np.random.Generator) -> dict[str, float]:
    """Catalog magnitudes: the truth flux with a photometric error from the variance."""
    out: dict[str, float] = {}
    for c, b in enumerate(bands):
        flux = float(obj["truth"][c].sum(dtype=np.float64))
        err = math.sqrt(SKY_VARIANCE[b] * 4 * math.pi * 9.0 + flux * INV_GAIN[b])
        meas = max(flux + err * float(rng.standard_normal()), 1e-3)
        out[f"{b}_cmodel_mag"] = 27.0 - 2.5 * math.log10(meas)
        out[f"{b}_cmodel_magerr"] = 1.0857 * err / meas
    return out


def build_mock_survey(
    root: str | os.PathLike,
    cfg: MockSurveyConfig,
    *,
    overwrite: bool = False,
    uri_root: str | None = None,
) -> Path:
    """Write a mock survey folder at ``root`` (a HATS catalog root; see module docstring).

    Returns the root. The truth table (``truth.parquet``) holds, per object, the true
    redshift and the truth image [C,N,N] in counts per model pixel (zero point 27).
    """
    root = Path(root)
    if root.exists():
        if not overwrite:
            raise FileExistsError(f"{root} exists; pass overwrite=True to rebuild it")
        shutil.rmtree(root)
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_objects
    ra0, dec0 = COSMOS_CENTRE
    h = cfg.field_radius_deg
    ra = ra0 + rng.uniform(-h, h, n) / math.cos(math.radians(dec0))
    dec = dec0 + rng.uniform(-h, h, n)
    object_id = 43158176442353664 + np.sort(rng.choice(10**9, n, replace=False)).astype(np.int64)
    tract = tract_wcs()
    rows, truth_rows, files = [], [], []
    for k in range(n):
        obj = _make_object(k, float(ra[k]), float(dec[k]), cfg, tract)
        oid = int(object_id[k])
        z = obj["z"]
        zp_rng = np.random.default_rng([cfg.seed, k, 1])
        sigma = 0.03 * (1 + z)
        photoz = max(0.01, z + sigma * float(zp_rng.standard_normal()))
        row = {
            "object_id": oid,
            "ra": float(ra[k]),
            "dec": float(dec[k]),
            "tract": 9813,
            "patch": int(4 * (dec[k] > dec0) + (ra[k] > ra0)),
            "i_extendedness_value": 1.0,
            "photoz_best": photoz,
            "photoz_err68_min": max(0.0, photoz - sigma * float(zp_rng.uniform(0.8, 1.2))),
            "photoz_err68_max": photoz + sigma * float(zp_rng.uniform(0.8, 1.2)),
            **_cmodel_mags(obj, cfg.bands, zp_rng),
        }
        for c, b in enumerate(cfg.bands):
            cut_rel, psf_rel = f"cutouts/{b}/{oid}.fits", f"psfs/{b}/{oid}.fits"
            row[f"{b}_cutout_uri"] = join_uri(uri_root, cut_rel) if uri_root else cut_rel
            row[f"{b}_psf_uri"] = join_uri(uri_root, psf_rel) if uri_root else psf_rel
            files.append((root / cut_rel, root / psf_rel, obj, c))
        rows.append(row)
        truth_rows.append(
            {
                "object_id": oid,
                "z_true": z,
                "i_mag_true": obj["mag_i"],
                "offset_y": obj["offset"][0],
                "offset_x": obj["offset"][1],
                "extras": obj["extras"],
                # issue-11 roles: nearest neighbour (HSC px, NaN: none), one overlapping the
                # target, a galaxy larger than the field (flux share outside it), image only
                "neighbour_sep_px": obj["neighbour_sep"],
                "overlapping_neighbour": obj["overlap"],
                "larger_than_field": obj["large"],
                "flux_outside_field": obj["flux_outside_field"],
                "image_only": obj["image_only"],
                **{f"seeing_{b}": obj["seeing"][c] for c, b in enumerate(cfg.bands)},
                "truth": obj["truth"],
            }
        )
    rows_per_partition = cfg.partition_rows or max(4, math.ceil(n / 2))
    catalog = lsdb.from_dataframe(
        pd.DataFrame(rows),
        ra_column="ra",
        dec_column="dec",
        partition_rows=rows_per_partition,
        catalog_name=cfg.catalog_name,
        margin_threshold=None,
    )
    catalog.write_catalog(root, as_collection=False, progress_bar=False)
    for cut_path, psf_path, obj, c in files:
        only = obj["image_only"]  # the cutout service's "image only": MASK, VARIANCE empty
        write_hsc_cutout(
            str(cut_path), obj["image"][c], None if only else obj["mask"][c],
            None if only else obj["variance"][c], obj["wcs"],
        )  # fmt: skip
        write_psf(str(psf_path), obj["psf"][c])
    truth = pa.table(
        {
            **{key: [t[key] for t in truth_rows] for key in truth_rows[0] if key != "truth"},
            "truth": tensor_array(np.stack([t["truth"] for t in truth_rows])),
        }
    )
    pq.write_table(truth, root / TRUTH_FILE)
    (root / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
    return root


def ensure_mock_survey(root: str | os.PathLike, cfg: MockSurveyConfig) -> Path:
    """The survey at ``root``, built (or rebuilt) unless it was built from ``cfg``."""
    root = Path(root)
    try:
        built = from_dict(MockSurveyConfig, json.loads((root / CONFIG_FILE).read_text()))
    except (OSError, ValueError):
        built = None
    if built == cfg:
        return root
    return build_mock_survey(root, cfg, overwrite=True)
