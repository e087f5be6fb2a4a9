"""A real galaxy with a known answer: HST COSMOS 147246 degraded to HSC, deconvolved, scored.

    python jobs/real_hst_check.py --prior priors/hsc-64 --z 0.4 0.8 --mag-i 20 \
        --out docs/results/real_hst/hsc-64

The HST/ACS F814W galaxy in ../shared/data (0.03''/px) is observed as HSC would see it
(``d4a_batch.validation.real_hst``: the model's resampling, the real HSC PSF and median
variance of each band of the scarlet COSMOS cutout, i = ``--mag-i``), written as HSC
cutout-service and PSF-picker FITS files, staged by the engine's Stager at each assumed
redshift ``--z`` (the galaxy's own redshift is not in the data) and sampled by the engine's
sampling stage (``pack_sampler.PackSampler``) in this process with the run's sampler settings (``RunConfig()`` defaults unless
``--steps``/``--samples``/``--sampler``). Reported per z: chi2/dof of the re-convolved
posterior mean and the Pearson correlation with the HST truth (resampled to HSC pixels,
no PSF) of the posterior mean and of the observation, over the whole model footprint and
over the core (1''). Writes ``real_hst.json``, ``real_hst.md`` and one figure per z.
Needs ../shared/data (exits with a message when it is absent).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from d4a_batch.config import RunConfig, to_dict
from d4a_batch.prior.artifact import read_prior_config
from d4a_batch.sampler_spec import SPEC_HELP, sampler_arg, sampler_from_args
from d4a_batch.schema import Col
from d4a_batch.survey.fits_io import hsc_tan_wcs, write_hsc_cutout, write_psf
from d4a_batch.survey.hats_io import (
    INPUT_PHOTOZ_HI,
    INPUT_PHOTOZ_LO,
    ORDER,
    PIXEL,
    cutout_column,
    psf_column,
)
from d4a_batch.survey.packs import OFFSET, SCALE
from d4a_batch.validation.real_hst import (
    HSC_NPZ,
    HST_FILE,
    degrade_to_hsc,
    hst_galaxy,
    score_real,
)
from d4a_batch.validation.report import run_header, write_json
from d4a_batch.validation.science import make_sampler, object_plots, run_packs, stage_objects

RA, DEC = 150.1, 2.2


def write_observation(obs, bands, folder: Path, z: float) -> dict:
    """FITS files of ``obs`` and the catalog row (engine column names) of the galaxy."""
    from hats.pixel_math.spatial_index import compute_spatial_index

    folder.mkdir(parents=True, exist_ok=True)
    stamp = obs.image.shape[-1]
    wcs = hsc_tan_wcs(RA, DEC, (stamp, stamp))
    # the galaxy sits at the stamp centre plus its offset (pixel centres at integers)
    cy, cx = stamp / 2 - 0.5 + obs.offset[0], stamp / 2 - 0.5 + obs.offset[1]
    ra, dec = (float(v) for v in wcs.pixel_to_world_values(cx, cy))
    row = {
        Col.OBJECT_ID: 147246, Col.RA: ra, Col.DEC: dec,
        Col.HEALPIX: int(compute_spatial_index(np.array([ra]), np.array([dec]))[0]),
        ORDER: 0, PIXEL: 0, Col.PHOTOZ: float(z),
        INPUT_PHOTOZ_LO: float("nan"), INPUT_PHOTOZ_HI: float("nan"),
    }  # fmt: skip
    for k, b in enumerate(bands):
        cut, psf = folder / f"cutout_{b}.fits", folder / f"psf_{b}.fits"
        mask = np.zeros(obs.image[k].shape, np.int32)
        write_hsc_cutout(str(cut), obs.image[k], mask, obs.variance[k], wcs)
        write_psf(str(psf), obs.psf[k])
        row[cutout_column(b)], row[psf_column(b)] = str(cut), str(psf)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prior", required=True, help="prior artifact folder")
    p.add_argument("--z", type=float, nargs="+", default=[0.4, 0.8], help="assumed redshifts")
    p.add_argument("--mag-i", type=float, default=20.0)
    p.add_argument("--steps", type=int)
    p.add_argument("--samples", type=int)
    p.add_argument("--sampler", type=sampler_arg, help="dps | daps | dds or any " + SPEC_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not (HST_FILE.exists() and HSC_NPZ.exists()):
        print(f"real_hst_check: needs {HST_FILE} and {HSC_NPZ} (../shared/data)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    prior_cfg, prior_meta = read_prior_config(args.prior)
    config = RunConfig(sampler=sampler_from_args(args, RunConfig().sampler))
    bands = tuple(prior_cfg.bands)
    i_band = bands.index("i")
    obs = degrade_to_hsc(hst_galaxy(), bands, args.mag_i)
    sampler, spec = make_sampler(args.prior, config, args.threads)
    results = []
    for z in args.z:
        folder = (args.out / f"z{z:g}").resolve()
        row = write_observation(obs, bands, folder / "fits", z)
        staged = stage_objects([row], str(folder / "fits"), prior_cfg, config)
        if staged[0].error is not None:
            raise RuntimeError(f"staging failed at z = {z}: {staged[0].error}")
        t0 = time.perf_counter()
        [(arrays, df, maps)] = run_packs(sampler, spec, staged, 1)
        seconds = time.perf_counter() - t0
        rec = {"z": z, "seconds": seconds, "stamp_size": int(arrays["image"].shape[-1])}
        rec |= score_real(
            obs, maps[Col.MEAN_FLUX][0].astype(np.float64), float(arrays[SCALE][0]),
            tuple(float(v) for v in arrays[OFFSET][0]), i_band, df.iloc[0].to_dict(),
        )  # fmt: skip
        [fig] = object_plots(folder, arrays, maps, df, arrays[SCALE], prior_cfg, k=1)
        rec["figure"] = str(fig)
        results.append(rec)
        print(
            f"[hst] z={z:g}: chi2/dof {rec['chi2']:.2f}, Pearson footprint mean "
            f"{rec['pearson_mean_footprint']:.3f} vs obs {rec['pearson_obs_footprint']:.3f}, "
            f"core {rec['pearson_mean_core']:.3f} vs {rec['pearson_obs_core']:.3f}, "
            f"u {rec['upsampling']:.2f}, flags {rec['flags'] or '-'} ({seconds:.0f} s)",
            flush=True,
        )
    doc = {
        **run_header(),
        "prior": {"path": str(Path(args.prior).resolve()), **prior_meta},
        "run_config": to_dict(config),
        "truth": str(HST_FILE),
        "hsc": str(HSC_NPZ),
        "mag_i": args.mag_i,
        "flux_counts": obs.flux,
        "results": results,
        "seconds": time.perf_counter() - t_start,
    }
    write_json(args.out / "real_hst.json", doc)
    head = "| z | u | chi2/dof | Pearson mean (footprint) | Pearson obs (footprint) | " \
           "Pearson mean (core) | Pearson obs (core) | truth light in footprint | flags |"  # fmt: skip
    lines = [head, "|" + "---|" * 9]
    for r in results:
        lines.append(
            f"| {r['z']:g} | {r['upsampling']:.2f} | {r['chi2']:.2f} | "
            f"{r['pearson_mean_footprint']:.3f} | {r['pearson_obs_footprint']:.3f} | "
            f"{r['pearson_mean_core']:.3f} | {r['pearson_obs_core']:.3f} | "
            f"{r['truth_light_in_footprint']:.3f} | {r['flags'] or '-'} |"
        )
    (args.out / "real_hst.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"seconds": doc["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
