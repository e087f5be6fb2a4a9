"""Real HSC pixels as image-only cutouts with 41x41 PSFs (../shared/data/scarlet/hsc_cosmos.npz:
no MASK or VARIANCE there), through make_catalog and staging. Skips when the data is absent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from d4a_batch.config import ColumnMap, PhysicsConfig, PriorConfig, StagingConfig
from d4a_batch.survey.fits_io import hsc_tan_wcs, write_hsc_cutout, write_psf
from d4a_batch.survey.hats_io import open_input_catalog, read_partition
from d4a_batch.survey.make_catalog import main as make_catalog_main
from d4a_batch.survey.staging import PSF, VALID, VARIANCE, Stager

BANDS = ("g", "r", "i")


@pytest.fixture
def real_image_only(shared_data, tmp_path):
    """Cutout-service image-only FITS + 41x41 PSF files of the field, a table of its sources."""
    d = np.load(shared_data / "scarlet" / "hsc_cosmos.npz")
    filters = [str(f) for f in d["filters"]]
    images, psfs, cat = d["images"], d["psfs"], d["catalog"]
    wcs = hsc_tan_wcs(150.1, 2.2, images.shape[1:])
    rows = []
    for b in BANDS:
        c = filters.index(b)
        write_hsc_cutout(str(tmp_path / f"cutout_{b}.fits"), images[c], None, None, wcs)
        write_psf(str(tmp_path / f"psf_{b}.fits"), psfs[c])
    for k in np.argsort(-cat["flux"])[:3]:  # the three brightest sources
        ra, dec = (float(v) for v in wcs.pixel_to_world_values(cat["x"][k], cat["y"][k]))
        row = {"object_id": 1000 + int(k), "ra": ra, "dec": dec, "z": 0.3}
        row |= {f"{b}_cutout": f"cutout_{b}.fits" for b in BANDS}
        row |= {f"{b}_psf": f"psf_{b}.fits" for b in BANDS}
        rows.append(row)
    table = tmp_path / "objects.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table, images, psfs, filters


def test_real_image_only_cutouts_stage_with_estimated_noise(real_image_only, tmp_path):
    table, _, psfs, filters = real_image_only
    out = tmp_path / "catalog"
    assert make_catalog_main([str(table), "--output", str(out)]) == 0
    cat = open_input_catalog(str(out))
    rows = [
        r
        for p in cat.partitions
        for r in read_partition(p, ColumnMap(), BANDS, cat.healpix_column).to_pylist()
    ]
    assert len(rows) == 3
    prior = PriorConfig()  # the demo prior's geometry: 64 px of 0.5 kpc
    stager = Stager(str(out), prior, PhysicsConfig(), StagingConfig())
    for obj in stager.stage_rows(rows, threads=1):
        assert obj.error is None, obj.error
        # 41x41 PSFs padded to 43x43 around their centre pixel, no flux lost
        assert obj.arrays[PSF].shape == (3, 43, 43)
        np.testing.assert_allclose(obj.psf_crop_loss, 0.0, atol=1e-12)
        for c, b in enumerate(BANDS):
            want = psfs[filters.index(b)] / psfs[filters.index(b)].sum()
            np.testing.assert_allclose(obj.arrays[PSF][c, 1:42, 1:42], want, atol=1e-6)
        # the noise comes from the stamp: every finite pixel valid, variance >= the sky's
        note = obj.noise_note
        assert note.startswith("g: MASK and VARIANCE empty: sky var "), note
        assert all(f"{b}: MASK and VARIANCE empty: sky var" in note for b in BANDS)
        valid = obj.arrays[VALID].astype(bool)
        assert valid.mean() > 0.2 and (valid == valid[0]).all()  # the rest: off the cutout
        var = obj.arrays[VARIANCE]
        assert np.all(var[valid] > 0) and np.all(np.isfinite(var[valid]))
        # sky variance of real HSC COSMOS coadds: 1e-4 .. 1e-2 counts^2 in g, r, i
        for c in range(3):
            assert 1e-4 < np.min(var[c][valid[c]]) < 1e-2
