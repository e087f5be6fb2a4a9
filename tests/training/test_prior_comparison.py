"""training.prior_comparison on the tiny random prior: held-out sets, one prior's entry, a
"real" galaxy's percentiles, samples read from an npz."""

from __future__ import annotations

import numpy as np
import pytest

from d4a_batch.testing import random_prior, write_prior
from d4a_batch.training.evaluate import FEATURE_NAMES
from d4a_batch.training.prior_comparison import (
    Sampling,
    evaluate_prior,
    heldout_entry,
    heldout_set,
    load_model,
    real_galaxy_entry,
    same_grid,
)


def test_one_prior_against_two_heldout_sets(tmp_path):
    path = write_prior(tmp_path / "prior", random_prior())
    model, cfg, info = load_model(path)
    assert info["kind"] == "artifact" and same_grid(cfg, cfg)
    sets = [heldout_set(cfg, s, 6, seed=5) for s in ("smooth", "realistic")]
    assert sets[0].features.shape == (6, len(FEATURE_NAMES)) and sets[0].floor >= 0
    res, x, f = evaluate_prior("tiny", path, model, cfg, info, sets, Sampling(2, 2, 0, 2))
    assert x.shape == (2, cfg.in_channels, 16, 16) and f.shape == (2, len(FEATURE_NAMES))
    assert res["n_samples"] == 2 and res["sampling_steps"] == 2
    assert res["frechet_distance"] == res["frechet_distance_by_heldout"]["smooth"]
    assert set(res["frechet_distance_by_heldout"]) == {"smooth", "realistic"}
    entry = heldout_entry(sets[1], 6, 5)
    assert entry["structure"] == "realistic" and set(entry["feature_quantiles"]) == set(
        FEATURE_NAMES
    )
    # a held-out mock as the "real" galaxy: percentiles in [0, 100]
    from d4a_batch.training.data import mock_images

    real = real_galaxy_entry(mock_images(np.arange(1), 99, cfg), cfg, f, sets)
    assert all(0 <= v <= 100 for v in real["percentile_in_heldout"]["realistic"].values())
    # samples drawn elsewhere: read back as they are; a wrong shape is refused
    np.savez(tmp_path / "x.npz", x=x)
    again, x2, _ = evaluate_prior("tiny", path, model, cfg, info, sets[:1],
                                  Sampling(samples=tmp_path / "x.npz"))  # fmt: skip
    assert np.array_equal(x2, x) and again["frechet_distance"] == res["frechet_distance"]
    np.savez(tmp_path / "bad.npz", x=x[:, :, :8])
    with pytest.raises(ValueError, match="do not fit the prior"):
        evaluate_prior("t", path, model, cfg, info, sets, Sampling(samples=tmp_path / "bad.npz"))
