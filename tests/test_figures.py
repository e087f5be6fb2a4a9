"""Figures render to PNG files of the expected pixel size on small synthetic inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from d4a_batch.figures import (
    asinh_rgb,
    magnitude_figure,
    object_figure,
    run_report,
    science_figure,
)
from d4a_batch.schema import Col, Flag, Status, band_col, obs_col, pct_col


def _size(path) -> tuple[int, int]:
    img = imread(path)
    return img.shape[1], img.shape[0]  # (width, height)


def _galaxy(n: int, c: int = 3) -> np.ndarray:
    r = np.arange(n) + 0.5 - n / 2
    prof = np.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * (n / 8) ** 2))
    return np.stack([(1 + b) * prof for b in range(c)])


def test_asinh_rgb_maps_bands_to_colours_and_clips():
    img = np.zeros((3, 4, 4))
    img[2] = 1.0  # i band only -> red
    rgb = asinh_rgb(img, np.ones(3))
    assert rgb.shape == (4, 4, 3)
    np.testing.assert_allclose(rgb[..., 0], 1.0)
    np.testing.assert_allclose(rgb[..., 1:], 0.0)
    assert asinh_rgb(-img, np.ones(3)).min() == 0.0  # negative flux clips to black
    half = asinh_rgb(0.5 * img, np.ones(3))[0, 0, 0]
    assert half == pytest.approx(np.arcsinh(50) / np.arcsinh(100))
    with pytest.raises(ValueError):
        asinh_rgb(np.zeros((2, 4, 4)))


def test_object_figure_renders_at_the_requested_size(tmp_path, rng):
    n, h = 16, 24
    truth = _galaxy(n)
    stamp = _galaxy(h) * 0.5 + 0.01 * rng.standard_normal((3, h, h))
    valid = np.ones((3, h, h), bool)
    valid[:, :, :2] = False
    samples = truth + 0.05 * rng.standard_normal((3, 3, n, n))
    path = object_figure(
        tmp_path / "obj.png",
        observation=stamp,
        variance=np.full(stamp.shape, 1e-4),
        valid=valid,
        reconvolved=_galaxy(h) * 0.5,
        mean_flux=samples.mean(0),
        std_flux=samples.std(0),
        variance_ratio=rng.uniform(0, 1, (n, n)),
        samples_flux=samples,
        truth=truth,
        title="object 1",
        notes=["chi2 1.02", "score 0.31"],
        figsize=(8, 6),
        dpi=50,
    )
    assert path.exists() and _size(path) == (400, 300)


def test_run_report_renders_a_catalog_with_errors_and_flags(tmp_path, rng):
    n = 12
    df = pd.DataFrame(
        {
            Col.OBJECT_ID: np.arange(n),
            Col.STATUS: [Status.OK.value] * (n - 2) + [Status.ERROR.value] * 2,
            Col.FLAGS: [0, int(Flag.POOR_FIT), int(Flag.PRIOR_DOMINATED | Flag.UPSAMPLING_HIGH)]
            * 4,
            Col.HALLUCINATION: rng.uniform(0, 1, n),
            Col.CHI2: rng.uniform(0.8, 5, n),
            Col.UPSAMPLING: rng.uniform(1, 5, n),
            Col.MASKED_FRACTION: rng.uniform(0, 0.4, n),
            band_col(Col.MAG, "i"): rng.uniform(20, 24, n),
        }
    )
    df.loc[df[Col.STATUS] == Status.ERROR.value, [Col.HALLUCINATION, Col.CHI2]] = np.nan
    path = run_report(tmp_path / "report.png", df, figsize=(9, 6), dpi=60)
    assert _size(path) == (720, 360)  # a fourth column: posterior against observed size
    # with the size columns (issue 31), one NaN size (a flag forbade it) among them
    r50_obs = rng.uniform(1, 6, n)
    df[obs_col(Col.R50_KPC)] = r50_obs
    df[Col.R50_KPC] = 0.7 * r50_obs
    df[pct_col(Col.R50_KPC, 16)] = 0.6 * r50_obs
    df[pct_col(Col.R50_KPC, 84)] = 0.8 * r50_obs
    df.loc[1, Col.R50_KPC] = np.nan
    path = run_report(tmp_path / "report_sizes.png", df, figsize=(9, 6), dpi=60)
    assert _size(path) == (720, 360)
    assert path.read_bytes() != (tmp_path / "report.png").read_bytes()


def test_magnitude_and_science_figures_render(tmp_path, rng):
    m, n, h = 3, 16, 20
    truth = np.stack([_galaxy(n) * 10.0**-k for k in range(m)])
    path = magnitude_figure(
        tmp_path / "mag.png",
        [18, 19, 20],
        [300.0, 120.0, 45.0],
        np.stack([_galaxy(h)] * m) + 0.01 * rng.standard_normal((m, 3, h, h)),
        truth,
        rng.uniform(0, 1, (m, n, n)),
        [0.1, 0.2, 0.3],
        truth=truth,
        dpi=40,
    )
    assert _size(path) == (round(40 * (2.4 * m + 1.0)), round(40 * 2.4 * 4))
    table = pd.DataFrame(
        {k: rng.uniform(1, 30, 8) for k in ("snr", "psnr_mean", "psnr_rl", "psnr_obs", "chi2")}
        | {k: rng.uniform(0, 1, 8) for k in ("hallucination", "coverage68", "coverage95")}
    )
    path = science_figure(tmp_path / "science.png", table, dpi=50)
    assert _size(path) == (700, 400)
