from __future__ import annotations

import numpy as np
import pytest
import torch

from d4a_batch.config import PhysicsConfig, PriorConfig
from d4a_batch.physics.cosmology import upsampling_factor
from d4a_batch.physics.operator import (
    ForwardOperator,
    ObservationBatch,
    chi2,
    degrees_of_freedom,
    model_pixel_scale,
    profile_amplitude,
    reduced_chi2,
    whitened_residual,
)
from d4a_batch.physics.psf import convolve_fft
from d4a_batch.physics.resample import resample
from d4a_batch.physics.stretch import inverse_stretch

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")],
)
PRIOR = PriorConfig(image_size=12, kpc_per_pixel=0.5)


def _gaussian_psfs(rng, rows: int, bands: int, p: int) -> np.ndarray:
    """Normalised elliptical Gaussians of random width per row and band: [R, C, P, P]."""
    y, x = np.indices((p, p)) - p // 2
    out = np.empty((rows, bands, p, p))
    for r in range(rows):
        for c in range(bands):
            sy, sx = rng.uniform(0.8, 1.8, 2)
            k = np.exp(-0.5 * ((y / sy) ** 2 + (x / sx) ** 2))
            out[r, c] = k / k.sum()
    return out


def _problem(rng, rows=4, bands=2, n=12, h=20, p=7, dtype=torch.float64, noise=True):
    """A batch of mixed redshifts, PSFs, offsets and masks, made from a known x, alpha, beta."""
    z = rng.uniform(0.2, 1.2, rows)
    scale = model_pixel_scale(z, PRIOR)
    offset = rng.uniform(-0.5, 0.5, (rows, 2))
    psf = _gaussian_psfs(rng, rows, bands, p)
    yy, xx = np.indices((n, n)) - (n - 1) / 2
    blob = np.exp(-0.5 * (yy**2 + xx**2) / 2.5**2)
    x = np.clip(2 * blob[None, None] - 1 + 0.1 * rng.normal(size=(rows, bands, n, n)), -1, 1)
    alpha = rng.uniform(50.0, 200.0, (rows, bands))
    beta = rng.uniform(-0.5, 0.5, (rows, bands))
    op = ForwardOperator(torch.as_tensor(psf, dtype=dtype), scale, offset, (h, h))
    m = op(torch.as_tensor(x, dtype=dtype)).double().numpy()
    var = rng.uniform(0.5, 2.0, (rows, bands, h, h))
    image = alpha[..., None, None] * m + beta[..., None, None]
    if noise:
        image = image + rng.normal(size=image.shape) * np.sqrt(var)
    valid = rng.random(image.shape) > np.linspace(0.0, 0.4, rows)[:, None, None, None]
    image[~valid] = np.nan  # masked pixels may hold anything
    obs = ObservationBatch.from_arrays(image, var, valid, psf, offset, dtype=dtype)
    return {"obs": obs, "op": op, "x": torch.as_tensor(x, dtype=dtype), "z": z}, alpha, beta


def test_linear_adjoint_identity(rng):
    prob, _, _ = _problem(rng)
    op = prob["op"]
    v = torch.as_tensor(rng.normal(size=(4, 2, 12, 12)))
    y = torch.as_tensor(rng.normal(size=(4, 2, 20, 20)))
    lhs = (op.linear(v) * y).sum()
    rhs = (v * op.adjoint(y, (12, 12))).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-12)
    # linear == PSF ⊛ resample, written out from the public pieces
    ref = convolve_fft(resample(v, op.scale, op.offset, (20, 20)), op.psf)
    torch.testing.assert_close(op.linear(v), ref)
    torch.testing.assert_close(op(prob["x"]), op.linear(inverse_stretch(prob["x"], 0.01)))


def test_gradcheck_profiled_residual(rng):
    prob, _, _ = _problem(rng, rows=2, bands=1, n=4, h=5, p=3)  # small: a full Jacobian
    obs, op = prob["obs"], prob["op"]
    x = (0.9 * prob["x"]).requires_grad_(True)
    # full Jacobian of (r, alpha, beta) w.r.t. x
    assert torch.autograd.gradcheck(lambda t: whitened_residual(t, obs, op), (x,))
    # and the sampler's scalar, the per-row norm of r
    assert torch.autograd.gradcheck(
        lambda t: whitened_residual(t, obs, op)[0].flatten(1).norm(dim=1), (x,)
    )


def test_mixed_batch_equals_one_by_one(rng):
    prob, _, _ = _problem(rng)
    obs, op, x = prob["obs"], prob["op"], prob["x"]
    r, alpha, beta = whitened_residual(x, obs, op)
    c2, rc2 = chi2(x, obs, op), reduced_chi2(x, obs, op)
    for i in range(4):
        sl = slice(i, i + 1)
        one = ObservationBatch(
            obs.image[sl], obs.variance[sl], obs.valid[sl], obs.psf[sl], obs.offset[sl]
        )
        op1 = ForwardOperator.for_observations(one, model_pixel_scale(prob["z"][sl], PRIOR))
        r1, a1, b1 = whitened_residual(x[sl], one, op1)
        torch.testing.assert_close(r[sl], r1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(alpha[sl], a1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(beta[sl], b1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c2[sl], chi2(x[sl], one, op1), rtol=1e-10, atol=0)
        torch.testing.assert_close(rc2[sl], reduced_chi2(x[sl], one, op1), rtol=1e-10, atol=0)


def test_selected_rows_are_the_operator_and_observations_of_those_rows(rng):
    """``select`` (the data step's rows that still iterate, ``sampling.dds``) slices the PSF
    transfer functions and overlap matrices: the same maps, bit for bit, as a new operator."""
    prob, _, _ = _problem(rng)
    obs, op, x = prob["obs"], prob["op"], prob["x"]
    op(x)  # the overlap matrices of this input shape are cached: select slices them too
    rows = torch.tensor([3, 1])
    sub_obs, sub_op = obs.select(rows), op.select(rows)
    fresh = ForwardOperator(op.psf[rows], op.scale[rows], op.offset[rows], op.out_shape)
    assert sub_op.rows == 2 and torch.equal(sub_obs.valid, obs.valid[rows])
    y = torch.as_tensor(rng.normal(size=(2, 2, 20, 20)))
    assert torch.equal(sub_op(x[rows]), op(x)[rows])
    assert torch.equal(sub_op(x[rows]), fresh(x[rows]))
    assert torch.equal(sub_op.adjoint(y, (12, 12)), fresh.adjoint(y, (12, 12)))
    r_sub = whitened_residual(x[rows], sub_obs, sub_op)[0]
    torch.testing.assert_close(r_sub, whitened_residual(x, obs, op)[0][rows], rtol=0, atol=0)


def test_repeated_rows_with_own_redshift(rng):
    # the sampler's layout: each object repeated S times, each row with its own z
    prob, _, _ = _problem(rng, rows=2)
    obs, x = prob["obs"], prob["x"]
    s = 3
    rows = obs.repeat_interleave(s)
    z_rows = rng.uniform(0.3, 0.9, 2 * s)
    op_rows = ForwardOperator.for_observations(rows, model_pixel_scale(z_rows, PRIOR))
    x_rows = x.repeat_interleave(s, dim=0)
    r, alpha, _ = whitened_residual(x_rows, rows, op_rows)
    for k in range(2 * s):
        o = k // s
        one = ObservationBatch(
            *(t[o : o + 1] for t in (obs.image, obs.variance, obs.valid, obs.psf, obs.offset))
        )
        op1 = ForwardOperator.for_observations(one, model_pixel_scale(z_rows[k : k + 1], PRIOR))
        r1, a1, _ = whitened_residual(x[o : o + 1], one, op1)
        torch.testing.assert_close(r[k : k + 1], r1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(alpha[k : k + 1], a1, rtol=1e-10, atol=1e-12)
    # different z, different residual: the rows really are independent
    assert not torch.allclose(r[0], r[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_profile_recovers_known_alpha_beta(dtype, rng):
    prob, alpha, beta = _problem(rng, noise=False, dtype=dtype)
    obs, op, x = prob["obs"], prob["op"], prob["x"]
    m = op(x)
    a0, b0 = profile_amplitude(m, obs.masked_image(), obs.weight(), ridge=0.0)
    a1, _ = profile_amplitude(m, obs.masked_image(), obs.weight())  # default ridge 1e-6
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    np.testing.assert_allclose(a0.double().numpy(), alpha, rtol=tol)
    np.testing.assert_allclose(b0.double().numpy(), beta, rtol=tol, atol=tol * alpha.max())
    # the ridge shrinks alpha exactly by C_mm / (C_mm + eps), eps = ridge (C_mm + sum w)
    w = obs.weight().double()
    m64 = m.double()
    dm = m64 - (w * m64).sum((-2, -1), keepdim=True) / w.sum((-2, -1), keepdim=True)
    c_mm = (w * dm * dm).sum((-2, -1))
    shrink = (c_mm / (c_mm + 1e-6 * (c_mm + w.sum((-2, -1))))).numpy()
    assert np.all(1 - shrink < 1e-3)
    np.testing.assert_allclose(a1.double().numpy(), alpha * shrink, rtol=tol)
    r, _, _ = whitened_residual(x, obs, op, ridge=0.0)
    assert r.abs().max().item() < (1e-9 if dtype == torch.float64 else 1e-3) * alpha.max()


def test_alpha_is_clamped_and_beta_resolved(rng):
    prob, _, _ = _problem(rng, rows=1, noise=False)
    obs, op, x = prob["obs"], prob["op"], prob["x"]
    m = op(x)
    w = obs.weight()
    y = -1.5 * m + 2.0  # anti-correlated: unconstrained alpha would be -1.5
    alpha, beta = profile_amplitude(m, y, w)
    assert torch.all(alpha == 0)
    torch.testing.assert_close(beta, (w * y).sum((-2, -1)) / w.sum((-2, -1)))


def test_degenerate_zero_model_is_finite(rng):
    prob, _, _ = _problem(rng, rows=2)
    obs, op = prob["obs"], prob["op"]
    valid = obs.valid.clone()
    valid[1, 0] = False  # one band of one object entirely masked
    obs = ObservationBatch(obs.image, obs.variance, valid, obs.psf, obs.offset)
    x = torch.full((2, 2, 12, 12), -1.0, dtype=torch.float64, requires_grad=True)  # v = 0 exactly
    assert op(x).abs().max().item() == 0.0
    r, alpha, beta = whitened_residual(x, obs, op)
    assert torch.all(alpha == 0)
    w, y = obs.weight(), obs.masked_image()
    torch.testing.assert_close(beta[0], (w[0] * y[0]).sum((-2, -1)) / w[0].sum((-2, -1)))
    assert beta[1, 0] == 0 and torch.all(r[1, 0] == 0)
    norm = r.flatten(1).norm(dim=1)  # the sampler's per-sample norm
    (grad,) = torch.autograd.grad(norm.sum(), x)
    assert torch.isfinite(r).all() and torch.isfinite(grad).all()
    assert degrees_of_freedom(obs.valid)[1] == valid[1, 1].sum() - 2


def test_reduced_chi2_of_the_truth_is_one(rng):
    prob, _, _ = _problem(rng, rows=3, h=48)
    obs, op, x = prob["obs"], prob["op"], prob["x"]
    dof = degrees_of_freedom(obs.valid).double()
    rc2 = reduced_chi2(x, obs, op)
    # chi²/dof of the true model with profiled alpha, beta: mean 1, sd sqrt(2/dof)
    assert torch.all((rc2 - 1).abs() < 5 * torch.sqrt(2 / dof))
    # a wrong model (the blob moved by 3 model pixels) is rejected by far
    wrong = torch.roll(x, shifts=(3, 3), dims=(-2, -1))
    assert torch.all(reduced_chi2(wrong, obs, op) - 1 > 20 * torch.sqrt(2 / dof))


def test_no_valid_pixel_gives_nan_reduced_chi2(rng):
    prob, _, _ = _problem(rng, rows=1)
    obs, x = prob["obs"], prob["x"]
    empty = ObservationBatch(
        obs.image, obs.variance, torch.zeros_like(obs.valid), obs.psf, obs.offset
    )
    op = ForwardOperator.for_observations(empty, prob["op"].scale)
    assert chi2(x, empty, op).item() == 0.0
    assert torch.isnan(reduced_chi2(x, empty, op)).all()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_float32_and_device_match_float64_cpu(device, rng):
    prob, _, _ = _problem(rng)
    obs64, op64, x64 = prob["obs"], prob["op"], prob["x"]
    r64, a64, _ = whitened_residual(x64, obs64, op64)
    obs32 = obs64.to(device=device, dtype=torch.float32)
    op32 = ForwardOperator.for_observations(obs32, op64.scale)
    x32 = x64.to(device=device, dtype=torch.float32).requires_grad_(True)
    r32, a32, _ = whitened_residual(x32, obs32, op32)
    assert r32.device.type == device and r32.dtype == torch.float32
    torch.testing.assert_close(a32.cpu().double(), a64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r32.detach().cpu().double(), r64, rtol=1e-3, atol=1e-3)
    (g,) = torch.autograd.grad(r32.flatten(1).norm(dim=1).sum(), x32)
    assert torch.isfinite(g).all()


def test_observation_batch_checks_shapes_and_values():
    img = torch.zeros(2, 3, 8, 8)
    var = torch.ones(2, 3, 8, 8)
    ok = torch.ones(2, 3, 8, 8, dtype=torch.bool)
    psf = torch.ones(2, 3, 5, 5) / 25
    off = torch.zeros(2, 2)
    ObservationBatch(img, var, ok, psf, off)
    with pytest.raises(ValueError, match="variance"):
        ObservationBatch(img, var[:, :2], ok, psf, off)
    with pytest.raises(ValueError, match="valid"):
        ObservationBatch(img, var, ok.float(), psf, off)
    with pytest.raises(ValueError, match="psf"):
        ObservationBatch(img, var, ok, psf[:1], off)
    with pytest.raises(ValueError, match="offset"):
        ObservationBatch(img, var, ok, psf, off.double())
    with pytest.raises(ValueError, match="image"):
        ObservationBatch(img.half(), var, ok, psf, off)
    with pytest.raises(ValueError, match="1 valid pixels"):
        bad = var.clone()
        bad[0, 0, 0, 0] = 0.0
        ObservationBatch(img, bad, ok, psf, off)
    # from_arrays marks non-finite and zero-variance pixels invalid instead
    bad_img = img.clone()
    bad_img[1, 2, 3, 4] = float("nan")
    obs = ObservationBatch.from_arrays(bad_img, var, ok, psf, off)
    assert obs.valid.sum() == ok.sum() - 1 and obs.weight()[1, 2, 3, 4] == 0
    assert obs.masked_image()[1, 2, 3, 4] == 0
    # raw FITS data are big-endian: accepted and converted
    big = ObservationBatch.from_arrays(
        img.numpy().astype(">f4"), var.numpy().astype(">f4"), ok.numpy(), psf.numpy(), off.numpy()
    )
    assert big.image.dtype == torch.float32 and torch.equal(big.variance, var)


def test_forward_operator_checks_its_geometry():
    psf = torch.ones(2, 1, 3, 3) / 9
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        ForwardOperator(psf, [0.5, 0.0], torch.zeros(2, 2), (8, 8))
    with pytest.raises(ValueError, match=r"offset\[2, 2\]"):
        ForwardOperator(psf, [0.5, 0.6], torch.zeros(2), (8, 8))
    op = ForwardOperator(psf, 0.5, torch.zeros(2, 2), (8, 8))  # one scale for all rows
    with pytest.raises(ValueError, match="linear"):
        op.linear(torch.zeros(3, 1, 4, 4))


def test_model_pixel_scale():
    z = np.array([0.1, 0.5, 1.0])
    scale = model_pixel_scale(z, PRIOR, PhysicsConfig())
    np.testing.assert_allclose(scale, 1 / upsampling_factor(z, 0.5))
    with pytest.raises(ValueError, match="invalid redshift"):
        model_pixel_scale(np.array([0.3, -1.0]), PRIOR)
