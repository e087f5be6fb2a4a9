from __future__ import annotations

import io
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from hats.pixel_math import HealpixPixel

from d4a_batch.config import ColumnMap, FlagThresholds, PhysicsConfig, SamplerConfig, StagingConfig
from d4a_batch.pack_sampler import pack_observations
from d4a_batch.prior.artifact import load_prior
from d4a_batch.quality.reasons import ObjectFlags, evaluate_flags, flag_objects
from d4a_batch.sampling.deconvolve import deconvolve
from d4a_batch.schema import (
    Col,
    Flag,
    Status,
    band_col,
    flag_names,
    morphology_columns,
    obs_col,
    pct_col,
)
from d4a_batch.survey.hats_io import (
    INPUT_PHOTOZ_HI,
    INPUT_PHOTOZ_LO,
    ORDER,
    PIXEL,
    open_input_catalog,
    partition_uri,
    read_partition,
)
from d4a_batch.survey.output import (
    OutputSpec,
    Provenance,
    fits_maps_bytes,
    merge_partition,
    output_table,
    write_chunks,
)
from d4a_batch.survey.packs import (
    KIND_ERRORS,
    make_packs,
    pack_arrays,
    pack_from_bytes,
)
from d4a_batch.survey.staging import Stager
from d4a_batch.survey.tensors import tensor_numpy
from d4a_batch.testing import TINY_PRIOR

SAMPLER = SamplerConfig(steps=2, samples=2, seed=3)
PROV = Provenance(
    "run-1", "tiny-test", "ab" * 32, "cfg", "0.1", 3, 2, 2, datetime(2026, 1, 2, tzinfo=UTC)
)
SPEC = OutputSpec(bands=TINY_PRIOR.bands, image_size=TINY_PRIOR.image_size)
Z_RANGE = (TINY_PRIOR.z_min, TINY_PRIOR.z_max)


@pytest.fixture(scope="module")
def packs(tiny_survey):
    cat = open_input_catalog(str(tiny_survey))
    rows = read_partition(cat.partitions[0], ColumnMap(), TINY_PRIOR.bands, cat.healpix_column)
    rows = rows.to_pylist()[:3]
    rows[0] = dict(rows[0], **{Col.PHOTOZ: float("nan")})
    stager = Stager(str(tiny_survey), TINY_PRIOR, PhysicsConfig(), StagingConfig())
    out = {}
    for p in make_packs(stager.stage_rows(rows), pack_size=8):
        out.setdefault(p["kind"], []).append(pack_from_bytes(p["pack"]))
    return out


@pytest.fixture(scope="module")
def sampled(packs, tiny_prior):
    prior = load_prior(tiny_prior)
    pack = packs["objects"][0]
    a = pack_arrays(pack)
    obs = pack_observations(a)
    err = np.stack([a[INPUT_PHOTOZ_LO], a[INPUT_PHOTOZ_HI]], 1)
    summ = deconvolve(obs, a[Col.PHOTOZ], prior, SAMPLER, a[Col.OBJECT_ID].tolist(), photoz_err=err)
    return pack, summ


def _flags(pack, summ=None, messages=None):
    """The pack's flags as the sampling stage decides them (quality.reasons)."""
    messages = pack[Col.MESSAGE].to_pylist() if messages is None else messages
    fit = None
    if summ is not None:
        fit = {"masked_fraction": pack[Col.MASKED_FRACTION].to_numpy(),
               "upsampling": 1 / pack["model_scale"].to_numpy(),
               "hallucination": summ.hallucination, "chi2_reduced": summ.chi2}  # fmt: skip
    return flag_objects(
        FlagThresholds(), z_range=Z_RANGE, bands=TINY_PRIOR.bands,
        photoz=pack[Col.PHOTOZ].to_numpy(), psf_sum=tensor_numpy(pack["psf_sum"]),
        psf_centroid_offset=tensor_numpy(pack["psf_centroid_offset"]), errors=messages, fit=fit,
    )  # fmt: skip


def _table(pack, summ=None, messages=None):
    return output_table(pack, summ, _flags(pack, summ, messages), SPEC, PROV, messages)


def test_schema_follows_bands_maps_and_kept_samples():
    names = SPEC.schema().names
    assert {band_col(Col.MAG, b) for b in "gri"} <= set(names)
    assert SPEC.schema().field(Col.MEAN_FLUX).type.shape == [3, 16, 16]
    assert SPEC.schema().field(Col.VARIANCE_RATIO).type.shape == [16, 16]
    assert Col.SAMPLES_X not in names and ORDER not in names
    bare = OutputSpec(bands=("i",), image_size=8, maps=False).schema().names
    assert Col.MEAN_X not in bare and band_col(Col.FLUX, "i") in bare and "flux_g" not in bare
    kept = OutputSpec(bands=("i",), image_size=8, keep_samples=2).schema()
    assert kept.field(Col.SAMPLES_X).type.shape == [2, 1, 8, 8]
    assert (
        OutputSpec(bands=("i",), image_size=8, map_dtype="float16")
        .schema()
        .field(Col.STD_X)
        .type.value_type
        == pa.float16()
    )


def test_error_records_become_error_rows_with_input_flags(packs):
    pack = packs[KIND_ERRORS][0]
    t = _table(pack)
    assert t.num_rows == 1 and t.drop_columns([ORDER, PIXEL]).schema == SPEC.schema()
    row = t.drop_columns(
        [Col.MEAN_X, Col.STD_X, Col.MEAN_FLUX, Col.STD_FLUX, Col.VARIANCE_RATIO]
    ).to_pylist()[0]
    assert row[Col.STATUS] == Status.ERROR and "photo-z: missing" in row[Col.MESSAGE]
    assert row[Col.FLAGS] == Flag.INPUT_ERROR | Flag.PHOTOZ_BAD
    assert row[Col.FLAG_NAMES] == "PHOTOZ_BAD|INPUT_ERROR"
    assert "INPUT_ERROR: input error: photo-z: missing" in row[Col.FLAG_REASONS]
    assert np.isnan(row[Col.HALLUCINATION]) and np.isnan(row[band_col(Col.FLUX, "i")])
    assert np.isnan(tensor_numpy(t[Col.MEAN_FLUX])).all()
    assert row[Col.RUN_ID] == "run-1" and row[Col.PRIOR_HASH] == "ab" * 32
    assert row[ORDER] == pack[ORDER][0].as_py()


def test_sampled_rows_carry_summaries_maps_and_flags(sampled):
    pack, summ = sampled
    t = _table(pack, summ)
    assert t[Col.OBJECT_ID].to_pylist() == pack[Col.OBJECT_ID].to_pylist()
    assert set(t[Col.STATUS].to_pylist()) == {Status.OK}
    mean_flux = tensor_numpy(t[Col.MEAN_FLUX])
    psf_sum, psf_cen = tensor_numpy(pack["psf_sum"]), tensor_numpy(pack["psf_centroid_offset"])
    for i in range(len(summ)):
        row = {k: t[k][i].as_py() for k in t.column_names if k not in SPEC.map_shapes()}
        np.testing.assert_array_equal(mean_flux[i], summ.mean_flux[i])
        assert row[Col.CHI2] == summ.chi2[i] and row[Col.HALLUCINATION] == summ.hallucination[i]
        assert row[Col.MASKED_FRACTION] == pack[Col.MASKED_FRACTION][i].as_py()
        for c, b in enumerate(TINY_PRIOR.bands):
            # flux = mean over samples of the summed flux image = sum of the mean flux map
            assert row[band_col(Col.FLUX, b)] == pytest.approx(
                float(mean_flux[i, c].sum(dtype=np.float64)), rel=1e-4, abs=1e-6
            )
        bits, reasons = evaluate_flags(
            FlagThresholds(), photoz=row[Col.PHOTOZ], z_range=Z_RANGE, psf_sum=psf_sum[i],
            psf_centroid_offset=psf_cen[i], bands=TINY_PRIOR.bands,
            masked_fraction=summ.masked_fraction[i], upsampling=summ.upsampling[i],
            hallucination=summ.hallucination[i], chi2_reduced=summ.chi2[i],
        )  # fmt: skip
        assert row[Col.FLAGS] == bits and row[Col.FLAG_NAMES] == "|".join(flag_names(bits))
        assert row[Col.FLAG_REASONS] == "; ".join(reasons)
        assert row[Col.STAMP_SIZE] == pack[Col.STAMP_SIZE][i].as_py()
        assert row[Col.UPSAMPLING] == pytest.approx(1.0 / pack["model_scale"][i].as_py())
        assert row[Col.SEED] == 3 and row[Col.STEPS] == 2 and row[Col.SAMPLES] == 2
    # a pack whose sampling failed: error rows for all, with the reason
    failed = _table(pack, None, ["sampling failed: X"] * pack.num_rows)
    assert set(failed[Col.STATUS].to_pylist()) == {Status.ERROR}
    assert np.isnan(failed[Col.CHI2].to_numpy()).all()
    assert set(failed[Col.FLAG_NAMES].to_pylist()) >= {"INPUT_ERROR"}
    assert set(failed[Col.MESSAGE].to_pylist()) == {"sampling failed: X"}


def test_morphology_columns_from_the_samples_nan_for_errors_and_truncated(sampled):
    pack, summ = sampled
    names = morphology_columns(TINY_PRIOR.bands)
    assert set(names) <= set(SPEC.schema().names) and Col.MEASURE_NOTES in SPEC.schema().names
    assert summ.morphology is not None and set(summ.morphology) == set(names)
    flags = _flags(pack, summ)
    t = output_table(pack, summ, flags, SPEC, PROV)
    for name in names:
        np.testing.assert_array_equal(t[name].to_numpy(), summ.morphology[name])
    r50 = t[Col.R50_KPC].to_numpy()
    assert np.isfinite(r50).any() and np.isfinite(t[obs_col(Col.R50_KPC)].to_numpy()).all()
    ok = np.isfinite(r50)
    lo, hi = t[pct_col(Col.R50_KPC, 16)].to_numpy(), t[pct_col(Col.R50_KPC, 84)].to_numpy()
    assert np.all((lo[ok] <= r50[ok]) & (r50[ok] <= hi[ok]))
    # a truncated object loses its sizes (posterior and observed), keeps its shape
    bits = flags.bits.copy()
    bits[0] |= int(Flag.TRUNCATED)
    cut = ObjectFlags(bits, flags.names, flags.reasons)
    t2 = output_table(pack, summ, cut, SPEC, PROV)
    for name in (Col.R50_KPC, pct_col(Col.R80_KPC, 84), obs_col(Col.R50_ARCSEC)):
        assert np.isnan(t2[name][0].as_py())
        assert t2[name][1:].to_pylist() == t[name][1:].to_pylist()  # the others keep theirs
    assert np.isfinite(t[obs_col(Col.R50_ARCSEC)][0].as_py())
    assert t2[Col.AXIS_RATIO][0].as_py() == t[Col.AXIS_RATIO][0].as_py()
    assert "TRUNCATED: " in t2[Col.MEASURE_NOTES][0].as_py()
    assert not any("TRUNCATED" in (x or "") for x in t2[Col.MEASURE_NOTES][1:].to_pylist())
    # error rows: NaN, no notes
    failed = _table(pack, None, ["sampling failed: X"] * pack.num_rows)
    assert all(np.isnan(failed[name].to_numpy()).all() for name in names)
    assert failed[Col.MEASURE_NOTES].null_count == pack.num_rows


def test_fits_maps_carry_a_wcs_at_the_model_pixel_scale(sampled):
    pack, summ = sampled
    t = _table(pack, summ)
    row = t.drop_columns(list(SPEC.map_shapes())).to_pylist()[0]
    row |= {name: tensor_numpy(t[name])[0] for name in SPEC.map_shapes()}
    hdul = fits.open(io.BytesIO(fits_maps_bytes(row, TINY_PRIOR.bands, 27.0)))
    assert [h.name for h in hdul][1:] == [
        "MEAN_FLUX_G", "MEAN_FLUX_R", "MEAN_FLUX_I", "STD_FLUX_G", "STD_FLUX_R", "STD_FLUX_I", "VARIANCE_RATIO"
    ]  # fmt: skip
    np.testing.assert_array_equal(hdul["MEAN_FLUX_R"].data, row[Col.MEAN_FLUX][1])
    wcs = WCS(hdul["MEAN_FLUX_I"].header)
    n = TINY_PRIOR.image_size
    # the object sits at the model grid's centre: pixel-edge n/2 = 0-based centre n/2 - 0.5
    ra, dec = wcs.pixel_to_world_values(n / 2 - 0.5, n / 2 - 0.5)
    assert (ra, dec) == pytest.approx((row[Col.RA], row[Col.DEC]), abs=1e-10)
    assert np.abs(wcs.proj_plane_pixel_scales()[0].to_value("arcsec")) == pytest.approx(
        row[Col.THETA_ARCSEC]
    )
    assert hdul[0].header["OBJID"] == str(row[Col.OBJECT_ID])
    assert wcs.wcs.cdelt[0] < 0  # RA increases to the left


def test_chunks_merge_into_one_partition_file_without_duplicates(sampled, tmp_path):
    pack, summ = sampled
    t = _table(pack, summ)
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    summaries = write_chunks(t, work)
    assert sum(s["n"] for s in summaries) == t.num_rows
    assert all(s["n_ok"] == s["n"] and s["n_error"] == 0 for s in summaries)
    write_chunks(t.slice(0, 1), work)  # as a retried task under another chunk name would
    o, p = summaries[0][ORDER], summaries[0][PIXEL]
    n = merge_partition(work, out, HealpixPixel(o, p)).num_rows
    with pytest.raises(RuntimeError, match="result rows for"):
        merge_partition(work, str(tmp_path / "out2"), HealpixPixel(o, p), expected_rows=n + 1)
    assert not (tmp_path / "out2").exists()  # a wrong count commits nothing
    merged = pq.read_table(partition_uri(out, o, p))
    assert n == merged.num_rows == summaries[0]["n"]
    assert sorted(merged[Col.OBJECT_ID].to_pylist()) == sorted(
        t.filter(pa.compute.equal(t[PIXEL], p))[Col.OBJECT_ID].to_pylist()
    )
    assert ORDER not in merged.column_names and merged.schema == SPEC.schema()
