"""The i < 24 population model: published relations reproduced, exact Sersic light law."""

from __future__ import annotations

import numpy as np
import pytest

from d4a_batch.mock.population import (
    Population,
    light_radius_in_square,
    mass_limit,
    number_density,
    sample_population,
    sersic_b,
    vdw14_size,
)


def test_van_der_wel_relations_at_the_table_redshifts():
    # Table 1 of van der Wel et al. 2014 at the pivot mass 5e10: R = A
    med, sig = vdw14_size(np.array([np.log10(5e10)]), 0.25, "late")
    assert med[0] == pytest.approx(10**0.86) and sig[0] == pytest.approx(0.16)
    med, _ = vdw14_size(np.array([np.log10(5e10)]), 1.25, "early")
    assert med[0] == pytest.approx(10**0.22)
    # early types grow faster with mass and shrink faster with z than late types
    lo, hi = vdw14_size(np.array([10.0, 11.0]), 0.5, "early")[0]
    lo_l, hi_l = vdw14_size(np.array([10.0, 11.0]), 0.5, "late")[0]
    assert hi / lo > hi_l / lo_l
    assert (
        vdw14_size(np.array([11.0]), 1.25, "early")[0]
        < vdw14_size(np.array([11.0]), 0.25, "early")[0]
    )


def test_mass_limit_and_density_fall_with_redshift():
    lims = [mass_limit(z, "late") for z in (0.2, 0.6, 1.2)]
    assert lims == sorted(lims)
    assert mass_limit(0.6, "early") > mass_limit(0.6, "late")
    assert number_density(0.3) > number_density(1.2) > 0


def test_sample_population_follows_the_size_relation():
    pop = sample_population(np.random.default_rng(0), 0.5, 4000)
    assert np.all(pop.logm >= mass_limit(0.5, "late") - 0.01)
    late = ~pop.early
    med, sig = vdw14_size(pop.logm[late], 0.5, "late")
    resid = np.log10(pop.r_eff_kpc[late] / med)
    assert np.median(resid) == pytest.approx(0.0, abs=0.02)
    assert np.std(resid) == pytest.approx(sig[0], rel=0.08)
    assert np.all((pop.q > 0.14) & (pop.q <= 1.0))


@pytest.mark.parametrize("n", [1.0, 4.0])
def test_light_in_square_matches_the_sersic_enclosed_light(n):
    # round profile: the square of half-side s holds more than the inscribed circle (radius s)
    # and less than the circumscribed one (radius s sqrt 2); for the 50 % level, R_eff sits
    # between the two
    k = 50
    pop = Population(
        z=0.5,
        logm=np.full(k, 10.0),
        early=np.full(k, n > 2),
        r_eff_kpc=np.full(k, 2.0),
        q=np.ones(k),
        sersic_n=np.full(k, n),
    )
    s50 = light_radius_in_square(np.random.default_rng(1), pop, 0.5, 4000)
    assert np.all(s50 < 2.0) and np.all(s50 * np.sqrt(2) > 2.0)
    assert sersic_b(np.array([1.0]))[0] == pytest.approx(1.6783, abs=1e-4)
    assert sersic_b(np.array([4.0]))[0] == pytest.approx(7.6692, abs=1e-3)
