from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.io import fits

from d4a_batch.config import PriorConfig
from d4a_batch.mock.galaxies import MockGalaxyParams, draw_galaxy
from d4a_batch.physics.stretch import inverse_stretch
from d4a_batch.training.data import (
    augment,
    default_max_shift,
    dequantise_u8,
    load_tng_image,
    mock_images,
    normaliser,
    quantise_u8,
    read_tng_idealized,
    rebin,
    to_model_space,
)

GALAXY = MockGalaxyParams(seed=5, disk_hlr_kpc=2.0, bulge_hlr_kpc=0.6, n_knots=15)


def _write_tng_fits(path, flux, kpc_per_pixel, bands=("g", "r", "i"), with_scale=True):
    """A TNG idealised-image FITS: one HDU per band, AB mag/arcsec^2 (99 = no light)."""
    hdus = [fits.PrimaryHDU()]
    for band, plane in zip(bands, flux):
        with np.errstate(divide="ignore"):
            # the reader's unit convention: flux per pixel = 10**(-0.4 mu) * p**2
            mu = np.where(plane > 0, -2.5 * np.log10(plane / kpc_per_pixel**2), 99.0)
        hdu = fits.ImageHDU(mu.astype(np.float32), name=f"SUBARU_HSC.{band.upper()}")
        hdu.header["BUNIT"] = "AB mag/arcsec2"
        if with_scale:
            hdu.header["CDELT1"] = kpc_per_pixel
            hdu.header["CDELT2"] = kpc_per_pixel
            hdu.header["CTYPE1"] = "kpc"
            hdu.header["CTYPE2"] = "kpc"
        hdus.append(hdu)
    fits.HDUList(hdus).writeto(path)


def test_tng_reader_round_trip_and_rebin_to_prior_grid(tmp_path):
    fine = draw_galaxy(GALAXY, kpc_per_pixel=0.1, n=400).astype(np.float64)  # 40 kpc field
    path = tmp_path / "shalo_091-1_v0_photo.fits"
    _write_tng_fits(path, fine, 0.1)
    flux, scale = read_tng_idealized(path)
    assert scale == pytest.approx(0.1)
    np.testing.assert_allclose(flux, fine, rtol=2e-6, atol=1e-30)  # float32 magnitudes
    cfg = PriorConfig(image_size=64, kpc_per_pixel=0.5)
    img = load_tng_image(path, cfg)
    assert img.shape == (3, 64, 64)
    # 5x5 blocks of 0.1 kpc pixels are one 0.5 kpc pixel: same as drawing at 0.5 kpc/px
    direct = draw_galaxy(GALAXY, kpc_per_pixel=0.5, n=64)
    np.testing.assert_allclose(img, direct, rtol=0, atol=2e-3 * direct.max())
    # flux inside the 32 kpc crop is conserved
    inner = fine[:, 40:360, 40:360].sum(axis=(1, 2))
    np.testing.assert_allclose(img.sum(axis=(1, 2)), inner, rtol=1e-5)


def test_rebin_non_integer_ratio_conserves_flux_and_centre():
    rng = np.random.default_rng(0)
    img = rng.random((2, 30, 30))
    out = rebin(img, kpc_in=0.13, kpc_out=0.5, n_out=16)  # 3.9 kpc in, 8 kpc out: all inside
    np.testing.assert_allclose(out.sum(axis=(1, 2)), img.sum(axis=(1, 2)), rtol=1e-12)
    point = np.zeros((1, 31, 31))
    point[0, 15, 15] = 1.0  # centre pixel of an odd grid straddles the output centre
    out = rebin(point, kpc_in=0.1, kpc_out=0.5, n_out=8)[0]
    assert out[3:5, 3:5].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(out[3:5, 3:5], 0.25)


def test_tng_scale_override_and_missing_keyword(tmp_path):
    fine = draw_galaxy(GALAXY, kpc_per_pixel=0.25, n=128).astype(np.float64)
    path = tmp_path / "noscale.fits"
    _write_tng_fits(path, fine, 0.25, with_scale=False)
    with pytest.raises(KeyError, match="CDELT1"):
        read_tng_idealized(path)
    flux, scale = read_tng_idealized(path, kpc_per_pixel_in=0.25)
    assert scale == 0.25
    np.testing.assert_allclose(flux, fine, rtol=2e-6)
    with pytest.raises(KeyError, match=r"SUBARU_HSC\.Z"):
        read_tng_idealized(path, bands=("z",), kpc_per_pixel_in=0.25)


def test_stretch_maps_brightest_pixel_to_one_and_inverts():
    img = draw_galaxy(GALAXY, kpc_per_pixel=0.5, n=64)
    m = normaliser(img)
    np.testing.assert_allclose(m, img.reshape(3, -1).max(axis=1))
    x = to_model_space(img, a=0.01)
    assert x.dtype == np.float32 and x.shape == (3, 64, 64)
    assert x.min() >= -1.0 and x.max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(x.reshape(3, -1).max(axis=1), 1.0, atol=1e-6)
    # the inverse stretch recovers I / m
    np.testing.assert_allclose(
        inverse_stretch(x.astype(np.float64), 0.01) * m[:, None, None], img, rtol=1e-4, atol=1e-9
    )
    with pytest.raises(ValueError, match="positive flux"):
        normaliser(np.zeros((3, 4, 4)))


def test_augment_is_a_shift_plus_symmetry_of_the_square():
    assert default_max_shift(256) == 10
    assert default_max_shift(64) == 3
    n, s = 16, 3
    x = -torch.ones(64, 1, n, n)
    x[:, 0, 8, 8] = 1.0  # a single lit pixel at (8, 8)
    x[:, 0, 8, 9] = 0.5  # and a dimmer neighbour that fixes the orientation
    out = augment(x, torch.Generator().manual_seed(0), s)
    assert out.shape == x.shape
    # nothing is lost or invented: same pixel values, background stays -1
    np.testing.assert_array_equal(
        np.sort(out.reshape(64, -1).numpy(), axis=1)[:, -2:], [[0.5, 1.0]] * 64
    )
    bright = [tuple(np.argwhere(o[0].numpy() == 1.0)[0]) for o in out]
    dim = [tuple(np.argwhere(o[0].numpy() == 0.5)[0]) for o in out]
    offsets = set()
    for (by, bx), (dy, dx) in zip(bright, dim):
        assert abs(by - dy) + abs(bx - dx) == 1  # neighbours stay neighbours
        offsets.add((dy - by, dx - bx))
    assert offsets == {(0, 1), (0, -1), (1, 0), (-1, 0)}  # all four orientations occur
    # symmetries of the square map index 8 to 7 or 8; then a shift of at most s
    coords = np.array(bright)
    assert coords.min() >= 7 - s and coords.max() <= 8 + s
    assert coords.min() < 7 and coords.max() > 8  # shifts do occur
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(augment(x, gen_a, s), augment(x, gen_b, s))


def test_augment_applies_each_images_own_draw_in_one_batched_pass():
    """The batched augmentation equals, image by image, its definition: crop the padded
    image at the drawn shift, flip if drawn, rotate by the drawn quarter turns; the draws
    come from the generator in the order rot [B], flip [B], shift [B, 2]."""
    b, n, s = 32, 12, 3
    x = torch.randn(b, 3, n, n, generator=torch.Generator().manual_seed(1))
    out = augment(x, torch.Generator().manual_seed(5), s)
    g = torch.Generator().manual_seed(5)
    rot = torch.randint(0, 4, (b,), generator=g).tolist()
    flip = torch.randint(0, 2, (b,), generator=g).tolist()
    shift = torch.randint(-s, s + 1, (b, 2), generator=g).tolist()
    padded = torch.nn.functional.pad(x, (s, s, s, s), value=-1.0)
    for k in range(b):
        dy, dx = shift[k]
        img = padded[k, :, s - dy : s - dy + n, s - dx : s - dx + n]
        img = img.flip(-1) if flip[k] else img
        assert torch.equal(out[k], torch.rot90(img, rot[k], dims=(-2, -1))), k
    assert len(set(rot)) == 4 and len(set(flip)) == 2


def test_quantise_u8_round_trip():
    x = np.linspace(-1.0, 1.0, 1001, dtype=np.float32)
    q = quantise_u8(x)
    assert q.dtype == np.uint8 and q.min() == 0 and q.max() == 255
    assert np.abs(dequantise_u8(q) - x).max() <= 1 / 255 + 1e-7
    grid = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(quantise_u8(dequantise_u8(grid)), grid)


def test_mock_images_deterministic_per_id():
    cfg = PriorConfig(image_size=32, kpc_per_pixel=1.0)
    a = mock_images([0, 1, 2], seed=11, cfg=cfg)
    b = mock_images([2], seed=11, cfg=cfg)
    c = mock_images([2], seed=12, cfg=cfg)
    assert a.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(a[2], b[0])
    assert not np.array_equal(b, c)
    assert a.min() >= -1 and np.allclose(a.reshape(3, 3, -1).max(axis=-1), 1.0, atol=1e-6)
