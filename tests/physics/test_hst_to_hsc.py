"""Real pixels: an HST/ACS galaxy degraded to HSC by the observation model, through HSC FITS files.

Truth: the COSMOS F814W galaxy (GalSim example data, 0.03"/pixel), sky-subtracted and cut to
a 3.5" radius (its neighbours are masked with noise beyond). Observation: the model's
resampling to 0.168", the real HSC i-band PSF of the scarlet COSMOS cutout, and noise at the
real HSC variance of that cutout, written with ``write_hsc_cutout`` / ``write_psf`` and read
back.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.io import fits

from d4a_batch.config import StagingConfig
from d4a_batch.physics.operator import (
    ForwardOperator,
    ObservationBatch,
    degrees_of_freedom,
    profile_amplitude,
)
from d4a_batch.survey.fits_io import (
    HSC_MASK_PLANES,
    hsc_tan_wcs,
    read_hsc_cutout,
    read_psf,
    write_hsc_cutout,
    write_psf,
)

HST_PIXEL = 0.03
SCALE = HST_PIXEL / 0.168  # an HST pixel in HSC pixels
STAMP = 112
OFFSET = (0.3, -0.2)
MAG_I = 18.0  # bright enough that the checks below sit >= 4 sigma above HSC noise
APERTURE = 35.0  # HSC pixels, for the flux and moments of the observation


def _moments(img: np.ndarray, weight: np.ndarray | None = None):
    """Flux, centroid (y, x) and unweighted second moments (Qyy, Qxx, Qxy) over ``weight`` > 0."""
    w = np.ones_like(img) if weight is None else weight
    y, x = np.indices(img.shape, dtype=np.float64)
    f = (w * img).sum()
    cy, cx = (w * img * y).sum() / f, (w * img * x).sum() / f
    q = np.array(
        [
            (w * img * (y - cy) ** 2).sum(),
            (w * img * (x - cx) ** 2).sum(),
            (w * img * (y - cy) * (x - cx)).sum(),
        ]
    )
    return f, np.array([cy, cx]), q / f


@pytest.fixture(scope="module")
def truth(shared_data):
    hst = fits.getdata(shared_data / "galsim" / "cosmos_147246_f814w.fits").astype(np.float64)
    n = hst.shape[0]
    y, x = np.indices(hst.shape)
    r_centre = np.hypot(y - (n - 1) / 2, x - (n - 1) / 2)
    galaxy = hst - np.median(hst[r_centre > 200])  # sky level from the outer ring
    core = r_centre < 60
    gy = (galaxy * y)[core].sum() / galaxy[core].sum()
    gx = (galaxy * x)[core].sum() / galaxy[core].sum()
    return np.where(np.hypot(y - gy, x - gx) < 3.5 / HST_PIXEL, galaxy, 0.0)


@pytest.fixture(scope="module")
def hsc_i(shared_data):
    data = np.load(shared_data / "scarlet" / "hsc_cosmos_35.npz")
    band = list(data["filters"]).index("i")
    return data["psfs"][band], float(np.median(data["variance"][band]))


def test_hst_galaxy_degraded_to_hsc_through_fits(truth, hsc_i, tmp_path):
    psf, variance = hsc_i
    flux = 10 ** (0.4 * (27.0 - MAG_I))  # counts at zero point 27
    v = truth / truth.sum()  # the truth in units of its total flux
    n = truth.shape[0]

    # --- observe: y = flux * PSF ⊛ R(v) + noise, written and read back as HSC files
    op = ForwardOperator(torch.from_numpy(psf)[None, None], [SCALE], [OFFSET], (STAMP, STAMP))
    clean = flux * op.linear(torch.from_numpy(v)[None, None])[0, 0].numpy()
    rng = np.random.default_rng(2024)
    image = clean + rng.normal(0.0, np.sqrt(variance), clean.shape)
    mask = np.zeros(clean.shape, np.int32)
    mask[clean > 5 * np.sqrt(variance)] |= 1 << HSC_MASK_PLANES["DETECTED"]
    image[5, 100:103] += 50.0  # a cosmic ray far from the galaxy, flagged CR
    mask[5, 100:103] |= 1 << HSC_MASK_PLANES["CR"]
    write_hsc_cutout(
        str(tmp_path / "i.fits"),
        image,
        mask,
        np.full(clean.shape, variance),
        hsc_tan_wcs(150.1, 2.2, clean.shape),
    )
    write_psf(str(tmp_path / "i_psf.fits"), psf)
    cut = read_hsc_cutout(str(tmp_path / "i.fits"))
    psf_read = read_psf(str(tmp_path / "i_psf.fits"))
    assert psf_read.raw_sum == pytest.approx(1.0, abs=1e-12)
    valid = cut.valid(StagingConfig().bad_mask_planes)
    assert valid.sum() == valid.size - 3

    # --- expectation from the truth at 0.03" (moments converted to HSC pixels²)
    _, c_truth, q_truth = _moments(truth)
    _, c_psf, q_psf = _moments(psf)
    # Resampling treats an HST pixel as a flat box (+ SCALE²/12) and integrates over HSC pixels
    # (+ 1/12 for a profile smooth on the HSC pixel scale), on the diagonal moments only.
    pixel = np.array([1.0, 1.0, 0.0]) * (SCALE**2 / 12 + 1 / 12)
    q_expect = q_truth * SCALE**2 + q_psf + pixel
    centre = (
        STAMP / 2
        - 0.5
        + np.array(OFFSET)
        + (c_truth - (n / 2 - 0.5)) * SCALE
        + c_psf
        - psf.shape[0] // 2
    )

    # --- measure in a circular aperture around the expected centre
    dy, dx = np.indices(clean.shape) - centre[:, None, None]
    r2 = dy**2 + dx**2
    aperture = (r2 < APERTURE**2) & valid
    f_obs, c_obs, q_obs = _moments(cut.image.astype(np.float64), aperture.astype(np.float64))
    # noise of these estimators (linearised), from the VARIANCE plane
    var_ap = cut.variance.astype(np.float64)[aperture]
    sig_f = np.sqrt(var_ap.sum())
    sig_c = (
        np.sqrt(np.array([(var_ap * dy[aperture] ** 2).sum(), (var_ap * dx[aperture] ** 2).sum()]))
        / flux
    )
    terms = (dy**2 - q_expect[0], dx**2 - q_expect[1], dy * dx - q_expect[2])
    sig_q = np.sqrt([(var_ap * t[aperture] ** 2).sum() for t in terms]) / flux
    # Systematics, measured on the noiseless image: the aperture (35 px, the 3.5" truth plus
    # the PSF's 21 px half-width) loses 1e-5 of the flux and <= 0.035 px² of each moment; the
    # "smooth on the HSC pixel scale" pixel term is good to ~0.03 px². Allow 0.1 px².
    assert sig_f / flux < 1e-3 and np.all(sig_q < 0.2)  # the checks below mean something
    assert f_obs == pytest.approx(flux, rel=0.01)
    assert abs(f_obs - flux) < 5 * sig_f + 1e-4 * flux
    assert np.all(np.abs(c_obs - centre) < 5 * sig_c + 0.01), (c_obs, centre, sig_c)
    assert np.all(np.abs(q_obs - q_expect) < 4 * sig_q + 0.1), (q_obs, q_expect, sig_q)
    # the PSF term (8.5 px²) is far outside that tolerance: its presence is really tested
    assert np.all(q_psf[:2] > 8 * (4 * sig_q[:2] + 0.1))

    # --- the profiled likelihood on the read-back files recovers the amplitude, chi²/dof ~ 1
    obs = ObservationBatch.from_arrays(
        cut.image[None, None],
        cut.variance[None, None],
        valid[None, None],
        psf_read.array[None, None],
        np.array([OFFSET]),
        dtype=torch.float64,
    )
    op_read = ForwardOperator.for_observations(obs, [SCALE])
    m = op_read.linear(torch.from_numpy(v)[None, None])
    alpha, beta = profile_amplitude(m, obs.masked_image(), obs.weight(), ridge=0.0)
    # their standard errors: the inverse of the 2x2 normal matrix
    w = obs.weight()
    s_mm, s_m1, s_11 = (w * m * m).sum().item(), (w * m).sum().item(), w.sum().item()
    det = s_mm * s_11 - s_m1**2
    sig_alpha, sig_beta = np.sqrt(s_11 / det), np.sqrt(s_mm / det)
    assert abs(alpha.item() - flux) < 5 * sig_alpha
    assert abs(beta.item()) < 5 * sig_beta
    r = w.sqrt() * (obs.masked_image() - alpha[..., None, None] * m - beta[..., None, None])
    dof = degrees_of_freedom(obs.valid).item()
    assert abs((r**2).sum().item() / dof - 1) < 5 * np.sqrt(2 / dof)
