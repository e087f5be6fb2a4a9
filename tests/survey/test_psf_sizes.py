"""PSFs of any odd size (issue 11): padded or cropped to StagingConfig.psf_size, renormalised,
centred; PSF_BAD only when a crop loses more than 1 % of the flux; even sizes refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from d4a_batch.config import ColumnMap, FlagThresholds, PhysicsConfig, StagingConfig
from d4a_batch.mock.survey import draw_psf
from d4a_batch.physics.psf import convolve_fft
from d4a_batch.quality.reasons import flag_objects
from d4a_batch.quality.rules import check_psf
from d4a_batch.schema import Flag
from d4a_batch.survey.fits_io import InputError, fit_psf_size, read_psf, write_psf
from d4a_batch.survey.hats_io import open_input_catalog, psf_column, read_partition
from d4a_batch.survey.packs import PSF_CROP_LOSS, pack_table
from d4a_batch.survey.staging import PSF, Stager
from d4a_batch.survey.tensors import tensor_numpy
from d4a_batch.testing import TINY_PRIOR

SIZE = StagingConfig().psf_size  # 43


def _centroid(img: np.ndarray) -> tuple[float, float]:
    yy, xx = np.indices(img.shape)
    return float((img * yy).sum() / img.sum()), float((img * xx).sum() / img.sum())


def _moffat(size: int, fwhm: float = 0.7, beta: float = 3.5, shift=(0.0, 0.0)) -> np.ndarray:
    """An analytic Moffat [size, size] centred at pixel size//2 + shift (not normalised)."""
    yy, xx = np.indices((size, size)) - size // 2
    alpha = fwhm / 0.168 / (2 * np.sqrt(2 ** (1 / beta) - 1))
    r2 = (yy - shift[0]) ** 2 + (xx - shift[1]) ** 2
    return (1 + r2 / alpha**2) ** -beta


@pytest.mark.parametrize("p", [31, 63])
def test_fit_psf_size_keeps_flux_and_centre(p):
    psf = draw_psf(0.7, 0.05, -0.03, size=p)  # galsim Moffat, sum 1, centre pixel p//2
    out, lost = fit_psf_size(psf, SIZE)
    assert out.shape == (SIZE, SIZE)
    assert out.sum() == pytest.approx(1.0, abs=1e-12)
    # the centre pixel moves to SIZE//2 and the profile is the same around it
    cy, cx = _centroid(psf)
    oy, ox = _centroid(out)
    off = SIZE // 2 - p // 2
    if p < SIZE:
        assert lost == 0.0
        assert (oy, ox) == pytest.approx((cy + off, cx + off), abs=1e-9)
        np.testing.assert_array_equal(out[off : off + p, off : off + p], psf / psf.sum())
        assert out[:off].sum() == 0 and out[:, -off:].sum() == 0
    else:
        h = (p - SIZE) // 2
        kept = psf[h : h + SIZE, h : h + SIZE]
        assert lost == pytest.approx(1 - kept.sum() / psf.sum(), rel=1e-12)
        assert 0 < lost < 0.01  # a 0.7'' Moffat beta 3.5 keeps > 99 % inside 43 px
        np.testing.assert_allclose(out, kept / kept.sum(), rtol=1e-12)
        assert (oy, ox) == pytest.approx((cy - h, cx - h), abs=0.02)
    # a point source convolved with either lands at the same place
    point = torch.zeros(1, 1, 64, 64, dtype=torch.float64)
    point[0, 0, 30, 33] = 1.0
    img = convolve_fft(point, torch.as_tensor(out)[None, None])[0, 0].numpy()
    assert _centroid(img) == pytest.approx((30.0, 33.0), abs=0.02)


def test_cropping_a_wide_psf_reports_the_lost_flux():
    wide = _moffat(63, fwhm=1.6, beta=2.0)  # broad wings: several % beyond 43 px
    out, lost = fit_psf_size(wide, SIZE)
    assert out.sum() == pytest.approx(1.0) and lost > 0.01
    bit, reason = check_psf([1.0], [0.0], FlagThresholds(), ["i"], crop_loss=[lost])
    assert bit == Flag.PSF_BAD
    assert reason == (
        f"i: cropping the PSF to the configured size lost {lost:.1%} of its flux (> 1.0%; renormalised)"
    )
    assert check_psf([1.0], [0.0], FlagThresholds(), ["i"], crop_loss=[0.004])[1] is None
    assert check_psf([1.0], [0.0], FlagThresholds(), ["i"], crop_loss=[np.nan])[1] is None


def test_even_psf_sides_are_refused(tmp_path):
    uri = str(tmp_path / "even.fits")
    write_psf(uri, np.ones((42, 42)))
    with pytest.raises(
        InputError, match=r"PSF side must be odd \(centre pixel P//2\), got shape \(42, 42\)"
    ):
        read_psf(uri, size=None)
    with pytest.raises(ValueError, match="odd square PSF"):
        fit_psf_size(np.ones((42, 42)), SIZE)


def test_stager_accepts_31_and_63_pixel_psfs_and_flags_a_lossy_crop(tiny_survey, tmp_path):
    root = tmp_path / "survey"
    shutil.copytree(tiny_survey, root)
    cat = open_input_catalog(str(root))
    rows = [
        r
        for part in cat.partitions
        for r in read_partition(part, ColumnMap(), TINY_PRIOR.bands).to_pylist()
    ]
    originals = {}
    for b, p in zip(TINY_PRIOR.bands, (31, 63, 63)):
        path = root / rows[0][psf_column(b)]
        psf = read_psf(str(path)).array
        h = abs(SIZE - p) // 2
        if p < SIZE:
            small = psf[h : SIZE - h, h : SIZE - h]
            write_psf(str(path), small)
            originals[b] = np.pad(small / small.sum(), h)
        else:
            big = np.pad(psf, h)  # the same PSF on a 63 px grid
            write_psf(str(path), big)
            originals[b] = psf
    wide = root / rows[1][psf_column("i")]
    write_psf(str(wide), _moffat(63, fwhm=1.6, beta=2.0))
    stager = Stager(str(root), TINY_PRIOR, PhysicsConfig(), StagingConfig())
    a, b = stager.stage_rows(rows[:2], threads=1)
    assert a.error is None and b.error is None, (a.error, b.error)
    assert a.arrays[PSF].shape == (3, SIZE, SIZE)
    for c, band in enumerate(TINY_PRIOR.bands):
        np.testing.assert_allclose(a.arrays[PSF][c], originals[band], atol=1e-7)
        assert a.arrays[PSF][c].sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(a.psf_crop_loss, 0.0, atol=1e-12)  # only zeros cut: no loss
    assert b.psf_crop_loss[2] > 0.01 and np.abs(b.psf_crop_loss[:2]).max() < 0.01
    # through the pack to the flags
    objs = [a, b] if a.stamp_size == b.stamp_size else [b]
    pack = pack_table(objs)
    loss = tensor_numpy(pack[PSF_CROP_LOSS])
    flags = flag_objects(
        FlagThresholds(),
        z_range=(0.0, 10.0),
        bands=TINY_PRIOR.bands,
        photoz=pack["photoz"].to_numpy(),
        psf_sum=tensor_numpy(pack["psf_sum"]),
        psf_centroid_offset=tensor_numpy(pack["psf_centroid_offset"]),
        errors=[None] * len(objs),
        psf_crop_loss=loss,
    )
    k = objs.index(b)
    assert flags.bits[k] & Flag.PSF_BAD
    assert (
        f"i: cropping the PSF to the configured size lost {b.psf_crop_loss[2]:.1%}"
        in (flags.reasons[k])
    )
    if len(objs) == 2:
        assert not flags.bits[0] & Flag.PSF_BAD
