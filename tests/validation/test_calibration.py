"""Calibration measurement and the conformal λ, on Gaussian posteriors whose answer is known.

Every pixel of galaxy g has an exact Gaussian posterior N(μ, σ²) (μ, σ drawn per pixel); the
truth is one draw of it. Samples drawn from that posterior are calibrated; samples with σ/w
are w times too narrow, so the interval that covers p must be w times wider (λ = w).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from d4a_batch.prior.calibration import z_score
from d4a_batch.validation.calibration import (
    calibration_report,
    coverage_per_galaxy,
    exact_gauss_coverage,
    patches,
    pit_histogram,
    pit_ranks,
    tarp_curve,
)
from d4a_batch.validation.conformal import (
    fit_calibration,
    fit_lambda,
    hb_ucb,
    hoeffding_ucb,
    normalised_residuals,
    wsr_ucb,
)


def gaussian_set(g: int, s: int, width: float, seed: int, shape=(1, 8, 8)):
    """(samples [G,S,*shape], truth [G,*shape]): truth ~ N(μ, σ²), samples ~ N(μ, (σ/width)²)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 3, (g, *shape))
    sigma = rng.uniform(0.5, 2.0, (g, *shape))
    truth = mu + sigma * rng.standard_normal((g, *shape))
    samples = mu[:, None] + (sigma / width)[:, None] * rng.standard_normal((g, s, *shape))
    return samples, truth


def test_exact_posterior_has_nominal_coverage_and_flat_pit():
    samples, truth = gaussian_set(200, 63, 1.0, seed=1)
    for level in (0.68, 0.95):
        gauss = coverage_per_galaxy(samples, truth, level, kind="gauss").mean()
        quant = coverage_per_galaxy(samples, truth, level, kind="quantile").mean()
        # S = 63: the std estimate and the empirical quantiles are slightly narrow
        assert gauss == pytest.approx(level, abs=0.02)
        assert quant == pytest.approx(level, abs=0.03)
    hist = pit_histogram(pit_ranks(samples, truth), 63, bins=8)
    assert hist.shape == (8,)
    assert np.all(np.abs(hist - 1) < 0.1), hist


def test_too_narrow_samples_under_cover_with_a_u_shaped_pit():
    samples, truth = gaussian_set(200, 63, 1.5, seed=2)
    cov68 = coverage_per_galaxy(samples, truth, 0.68).mean()
    cov95 = coverage_per_galaxy(samples, truth, 0.95).mean()
    # a 1.5x too narrow interval covers P(|Z| < z_p / 1.5)
    assert cov68 == pytest.approx(math.erf(1.0 / 1.5 / math.sqrt(2)), abs=0.02)
    assert cov95 == pytest.approx(math.erf(z_score(0.95) / 1.5 / math.sqrt(2)), abs=0.02)
    hist = pit_histogram(pit_ranks(samples, truth), 63, bins=8)
    assert hist[0] > 1.5 and hist[-1] > 1.5 and hist[3:5].max() < 0.8, hist


def test_a_mask_selects_the_pixels_scored():
    samples, truth = gaussian_set(4, 16, 1.0, seed=3)
    truth[:, :, :4] = 1e6  # far outside in the top half only
    mask = np.zeros((8, 8), bool)
    mask[4:] = True
    assert coverage_per_galaxy(samples, truth, 0.95, mask=~mask).max() == 0.0
    assert coverage_per_galaxy(samples, truth, 0.95, mask=mask).min() > 0.5
    with pytest.raises(ValueError, match="selects no pixel"):
        coverage_per_galaxy(samples, truth, 0.95, mask=np.zeros((8, 8), bool))


def test_patches_cut_the_core_into_vectors_of_bands_and_pixels():
    img = np.arange(2 * 16 * 16, dtype=float).reshape(2, 16, 16)
    p = patches(img, 4, "stamp")
    assert p.shape == (16, 2 * 16)
    # first patch: band 0 rows 0-3 cols 0-3, then band 1
    assert np.array_equal(p[0, :16], img[0, :4, :4].ravel())
    assert np.array_equal(p[0, 16:], img[1, :4, :4].ravel())
    core = patches(img[None], 4, "core", core_radius=3.0)  # central 8x8 -> 4 patches
    assert core.shape == (1, 4, 32)
    assert np.array_equal(core[0, 0, :16], img[0, 4:8, 4:8].ravel())


def test_tarp_is_on_the_diagonal_when_calibrated_and_off_it_when_too_narrow():
    cal = tarp_curve(*gaussian_set(60, 50, 1.0, seed=4, shape=(1, 16, 16)), patch=4,
                     region="stamp", bins=10)  # fmt: skip
    narrow = tarp_curve(*gaussian_set(60, 50, 2.0, seed=4, shape=(1, 16, 16)), patch=4,
                        region="stamp", bins=10)  # fmt: skip
    assert cal["n_sims"] == 60 * 16 and cal["dims"] == 16
    assert len(cal["ecp"]) == len(cal["alpha"]) == 11
    assert cal["max_deviation"] < 0.1, cal["max_deviation"]
    assert narrow["max_deviation"] > 2 * cal["max_deviation"] + 0.1
    # numpy's global generator is left as it was
    np.random.seed(5)  # noqa: NPY002
    a = np.random.random()  # noqa: NPY002
    np.random.seed(5)  # noqa: NPY002
    tarp_curve(*gaussian_set(5, 8, 1.0, seed=0, shape=(1, 8, 8)), patch=4, region="stamp")
    assert np.random.random() == a  # noqa: NPY002


def test_hoeffding_and_hoeffding_bentkus_bounds():
    assert hoeffding_ucb(0.2, 50, 0.1) == pytest.approx(0.2 + math.sqrt(math.log(10) / 100))
    # zero empirical risk: the Hoeffding term (1 - R)^n = delta decides
    assert hb_ucb(0.0, 16, 0.1) == pytest.approx(1 - 0.1 ** (1 / 16), abs=1e-4)
    # HB is never looser than Hoeffding, and shrinks towards the risk with n
    for r in (0.05, 0.3):
        for n in (20, 200, 2000):
            assert r <= hb_ucb(r, n, 0.1) <= hoeffding_ucb(r, n, 0.1) + 1e-9
    assert hb_ucb(0.3, 2000, 0.1) - 0.3 < 0.03


def test_exact_gauss_coverage_is_what_an_exact_posterior_gives_with_few_samples():
    """S draws and the truth from one Gaussian: the measured coverage of mean ± z·std equals
    the Student-t formula (and tends to the level as S grows)."""
    for n_s in (4, 16):
        samples, truth = gaussian_set(400, n_s, 1.0, seed=20 + n_s)
        for level in (0.68, 0.95):
            measured = coverage_per_galaxy(samples, truth, level, kind="gauss").mean()
            assert measured == pytest.approx(exact_gauss_coverage(level, n_s), abs=0.01)
    assert exact_gauss_coverage(0.68, 4) == pytest.approx(0.561, abs=0.002)
    assert exact_gauss_coverage(0.95, 10_000) == pytest.approx(0.95, abs=1e-3)


def test_wsr_bound_is_valid_and_adapts_to_the_losses_spread():
    """Validity: over many draws of n losses with a known mean, the bound falls below the mean
    at most a δ share of the time; tightness: for losses that spread little (std 0.05, like
    per-galaxy miscovered fractions) its slack is a fraction of Hoeffding's worst-case one."""
    rng = np.random.default_rng(12)
    delta, n, trials = 0.1, 100, 300
    # Beta(2, 6): mean 0.25, std 0.14
    misses = sum(wsr_ucb(rng.beta(2, 6, n), delta) < 0.25 for _ in range(trials))
    assert misses / trials <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)
    narrow = np.clip(0.3 + 0.05 * rng.standard_normal(n), 0, 1)
    slack = wsr_ucb(narrow, delta) - narrow.mean()
    assert 0 < slack < 0.4 * (hoeffding_ucb(narrow.mean(), n, delta) - narrow.mean()), slack
    # degenerate inputs: all ones cannot be bounded below 1; the bound exceeds the mean
    assert wsr_ucb(np.ones(20), delta) == 1.0
    assert wsr_ucb(np.zeros(200), delta) < 0.03
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        wsr_ucb(np.array([0.2, 1.5]), delta)


def test_lambda_of_too_narrow_samples_is_their_width_and_holds_on_held_out_data():
    calib = gaussian_set(600, 100, 1.5, seed=6)
    held_out = gaussian_set(600, 100, 1.5, seed=7)
    for level in (0.68, 0.95):
        q = normalised_residuals(*calib, level)
        plug_in = fit_lambda(q, 1 - level, bound="none")
        assert plug_in.lam == pytest.approx(1.5, rel=0.04)
        for bound in ("hb", "wsr"):
            rcps = fit_lambda(q, 1 - level, delta=0.1, bound=bound)
            assert rcps.lam >= plug_in.lam and rcps.ucb <= 1 - level
            cov = coverage_per_galaxy(*held_out, level, lam=rcps.lam).mean()
            # guaranteed side: at least nominal (up to the held-out set's own noise); not
            # wasteful
            assert level - 0.01 <= cov <= level + 0.04, (level, bound, cov)
        cov_hat = coverage_per_galaxy(*held_out, level, lam=plug_in.lam).mean()
        assert cov_hat == pytest.approx(level, abs=0.015)


def test_too_few_galaxies_cannot_certify_a_small_alpha():
    q = normalised_residuals(*gaussian_set(16, 32, 1.0, seed=8), 0.95)
    fit = fit_lambda(q, 0.05, delta=0.1, bound="hb")
    assert fit.lam is None and fit.lam_hat is not None  # 1 - 0.1^(1/16) = 0.134 > 0.05
    assert fit_lambda(q, 0.05, bound="none").lam == fit.lam_hat


def test_fit_per_snr_bin_recovers_each_bins_width_and_the_report_shows_it():
    faint = gaussian_set(300, 60, 1.0, seed=9)
    bright = gaussian_set(300, 60, 2.0, seed=10)
    samples = np.concatenate([faint[0], bright[0]])
    truth = np.concatenate([faint[1], bright[1]])
    snr = np.concatenate([np.full(300, 5.0), np.full(300, 500.0)])
    edges = (0.0, 30.0, math.inf)
    lambdas, counts, details = fit_calibration(samples, truth, snr, edges, None, bound="none")
    assert counts == [300, 300]
    assert lambdas["68"][0] == pytest.approx(1.0, rel=0.05)
    assert lambdas["68"][1] == pytest.approx(2.0, rel=0.05)
    assert details["68"]["bins"][1]["source"] == "bin"
    lam = {k: np.where(snr < 30, v[0], v[1]) for k, v in lambdas.items()}
    core = np.ones((8, 8), bool)
    rep = calibration_report(samples, truth, snr, edges, core, lambdas=lam, core_radius=4.0)
    b0, b1 = rep["bins"]
    assert b0["n"] == b1["n"] == 300 and rep["pooled"]["n"] == 600
    assert b1["cov68_core_gauss"] < 0.45  # raw: 2x too narrow
    for b in (b0, b1, rep["pooled"]):
        assert b["cov68_core_calibrated"] == pytest.approx(0.68, abs=0.02)
        assert b["cov95_stamp_calibrated"] == pytest.approx(0.95, abs=0.02)
    assert b1["pit_core"][0] > 1.5 and abs(b0["pit_core"][0] - 1) < 0.3
    assert b1["tarp_core"]["max_deviation"] > b0["tarp_core"]["max_deviation"]
    assert len(rep["per_galaxy"]) == 600


def test_a_bin_without_enough_galaxies_takes_the_pooled_lambda():
    samples, truth = gaussian_set(200, 40, 1.3, seed=11)
    snr = np.where(np.arange(200) < 198, 10.0, 200.0)
    lambdas, counts, details = fit_calibration(
        samples, truth, snr, (0.0, 100.0, math.inf), None, levels=(0.68,), min_per_bin=5
    )
    assert counts == [198, 2]
    assert details["68"]["bins"][1]["source"] == "pooled"
    assert lambdas["68"][1] == details["68"]["pooled"]["lambda"]


def test_engine_output_is_scored_raw_and_with_the_catalogs_lambda(tmp_path):
    """Tiny prior + calibration.json -> the engine's sampling stage -> pack_inputs -> engine_report."""
    from d4a_batch.config import RunConfig, SamplerConfig, to_dict
    from d4a_batch.prior.calibration import Calibration, sampler_fingerprint, write_calibration
    from d4a_batch.testing import TINY_PRIOR, make_tiny_prior, make_tiny_survey
    from d4a_batch.validation.calibration import engine_report, pack_inputs
    from d4a_batch.validation.metrics import core_mask
    from d4a_batch.validation.science import (
        make_sampler,
        read_rows,
        read_truth,
        run_packs,
        stage_objects,
    )

    config = RunConfig(sampler=SamplerConfig(steps=2, samples=4))
    prior = make_tiny_prior(tmp_path / "prior")
    write_calibration(prior, Calibration(
        snr_edges=(0.0, math.inf), levels=(0.68, 0.95), lambdas={"68": (2.0,), "95": (3.0,)},
        sampler_fingerprint=sampler_fingerprint(config.sampler), delta=0.1, bound="none",
        n_per_bin=(1,), sampler=to_dict(config.sampler),
    ))  # fmt: skip
    survey = make_tiny_survey(tmp_path / "survey", n_objects=3)
    truth = read_truth(survey)
    objs = stage_objects(read_rows(str(survey), TINY_PRIOR.bands), str(survey), TINY_PRIOR, config)
    sampler, spec = make_sampler(str(prior), config)
    results = run_packs(sampler, spec, [o for o in objs if o.error is None][:2], batch_size=2)
    packs = [pack_inputs(a, df, m, truth, TINY_PRIOR.stretch.a, 1e-6) for a, df, m in results]
    assert packs[0]["flux"].shape[1:] == (4, 3, 16, 16)
    np.testing.assert_array_equal(np.concatenate([p["68"] for p in packs]), 2.0)
    core = core_mask(16, 30 / 256)
    rep = engine_report(packs, (0.0, 30.0, math.inf), core, core_radius=2.0, tarp_patch=2)
    pooled = rep["pooled"]
    assert pooled["n"] == sum(len(p["snr"]) for p in packs)
    for k in ("68", "95"):
        # a wider interval never covers less
        assert pooled[f"cov{k}_core_calibrated"] >= pooled[f"cov{k}_core_gauss"]
        assert 0 <= pooled[f"cov{k}_stamp_quantile"] <= 1
    assert len(pooled["pit_core"]) == 5 and len(pooled["tarp_core"]["ecp"]) >= 3
