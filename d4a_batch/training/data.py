"""Training images: TNG idealised-image reader, normalisation/stretch, augmentation, Ray datasets.

Only numpy and torch are imported at module level (astropy for the TNG reader, GalSim for
the mocks and Ray for the datasets are imported where used), so a training process on a
machine without them (``jobs/train_prior.py --single-process`` on a lent GPU) can use the
augmentation and the 8-bit training-set helpers.

Every training image goes through one path (DESIGN.md section 2):
flux per pixel ``I[C,N,N]`` at the prior's kpc/pixel -> ``v = I / m`` with
``m[c] = max_pixels I[c]`` (per image, per band: the brightest pixel maps to
v = 1, so x spans exactly [-1, 1] and nothing clips) -> ``x = stretch(v, a)``.

IllustrisTNG idealised HSC images (the SKIRT "HSC-SSP Idealized" products)
hold one image HDU per band named ``SUBARU_HSC.G`` / ``.R`` / ``.I`` in AB
mag/arcsec^2 (99 where there is no light), with the physical pixel size in kpc
in ``CDELT1`` (``CTYPE1 = 'kpc'``); ``kpc_per_pixel_in`` overrides it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from d4a_batch.config import PriorConfig
from d4a_batch.physics.resample import overlap_matrix
from d4a_batch.physics.stretch import stretch

TNG_EXTNAME = "SUBARU_HSC.{BAND}"
TNG_SCALE_KEY = "CDELT1"
TNG_NO_LIGHT_MAG = 99.0
X_COLUMN = "x"
ID_COLUMN = "id"


# --------------------------------------------------------------------------- TNG reader
def read_tng_idealized(
    path: str | Path,
    bands: Sequence[str] = ("g", "r", "i"),
    kpc_per_pixel_in: float | None = None,
) -> tuple[np.ndarray, float]:
    """Flux-per-pixel image ``[C, H, W]`` (float64) of a TNG idealised FITS, and its kpc/pixel.

    mag/arcsec^2 -> ``10**(-0.4 mu) * p**2`` (p = kpc/pixel): proportional to
    the flux in each pixel, the same constant for every band and pixel (the
    per-band normaliser removes it). mu >= 99 or non-finite means no light.
    """
    from astropy.io import fits

    planes = []
    scale = kpc_per_pixel_in
    with fits.open(path) as hdul:
        for band in bands:
            name = TNG_EXTNAME.format(BAND=band.upper())
            if name not in hdul:
                raise KeyError(f"{path}: no extension {name!r} for band {band!r}")
            hdu = hdul[name]
            if scale is None:
                if TNG_SCALE_KEY not in hdu.header:
                    raise KeyError(
                        f"{path}[{name}]: no {TNG_SCALE_KEY} (kpc/pixel); pass kpc_per_pixel_in"
                    )
                unit = str(hdu.header.get("CTYPE1", "kpc")).strip().lower()
                if unit != "kpc":
                    raise ValueError(f"{path}[{name}]: CTYPE1 is {unit!r}, expected 'kpc'")
                scale = float(hdu.header[TNG_SCALE_KEY])
            bunit = str(hdu.header.get("BUNIT", "mag/arcsec2")).lower()
            if "mag" not in bunit:
                raise ValueError(f"{path}[{name}]: BUNIT {bunit!r} is not AB mag/arcsec^2")
            mu = np.asarray(hdu.data, dtype=np.float64)
            planes.append(mu)
    shapes = {p.shape for p in planes}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"{path}: band images must be 2-D and of one shape, got {shapes}")
    if not (scale is not None and scale > 0):
        raise ValueError(f"{path}: kpc/pixel must be > 0, got {scale}")
    mu = np.stack(planes)
    dark = ~np.isfinite(mu) | (mu >= TNG_NO_LIGHT_MAG)
    flux = np.where(dark, 0.0, 10.0 ** (-0.4 * np.where(dark, 0.0, mu))) * scale**2
    return flux, float(scale)


def rebin(img: np.ndarray, kpc_in: float, kpc_out: float, n_out: int) -> np.ndarray:
    """Flux-conserving area-overlap rebin of ``img[C, H, W]`` to ``[C, n_out, n_out]``.

    Both grids share their centre; input light outside the output grid is cut.
    """
    _, h, w = img.shape
    ry = overlap_matrix(n_out, h, kpc_in / kpc_out).numpy()  # [n_out, H]
    rx = overlap_matrix(n_out, w, kpc_in / kpc_out).numpy()  # [n_out, W]
    return np.einsum("yh,chw,xw->cyx", ry, img, rx)


def load_tng_image(
    path: str | Path,
    cfg: PriorConfig,
    kpc_per_pixel_in: float | None = None,
) -> np.ndarray:
    """TNG idealised image at the prior's kpc/pixel and size: flux per pixel ``[C, N, N]``."""
    flux, scale = read_tng_idealized(path, cfg.bands, kpc_per_pixel_in)
    return rebin(flux, scale, cfg.kpc_per_pixel, cfg.image_size).astype(np.float32)


# --------------------------------------------------------------------------- stretch
def normaliser(img: np.ndarray) -> np.ndarray:
    """Per-band normaliser ``m[C]``: the brightest pixel of each band of ``img[C, N, N]``."""
    m = img.reshape(img.shape[0], -1).max(axis=1)
    if not np.all(m > 0):
        raise ValueError(f"every band needs some positive flux; maxima {m}")
    return m


def to_model_space(img: np.ndarray, a: float) -> np.ndarray:
    """Flux image ``[C, N, N]`` -> x ``[C, N, N]`` in [-1, 1] (float32): stretch(I / m, a)."""
    v = np.clip(img, 0.0, None) / normaliser(img)[:, None, None]
    return stretch(v, a).astype(np.float32)


def quantise_u8(x: np.ndarray) -> np.ndarray:
    """x-space images in [-1, 1] -> uint8 ``q = round((x + 1) * 127.5)`` (8-bit, as image
    datasets are stored; the error is at most 1/255 in x)."""
    return np.clip(np.rint((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def dequantise_u8(q: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """uint8 ``q`` -> x = q / 127.5 - 1 (float32, numpy or torch as given, on its device);
    the inverse of ``quantise_u8`` on its grid."""
    if isinstance(q, torch.Tensor):
        return q.float() / 127.5 - 1.0
    return (np.asarray(q, dtype=np.float32) / 127.5 - 1.0).astype(np.float32)


# --------------------------------------------------------------------------- augmentation
def default_max_shift(image_size: int) -> int:
    """Largest random shift in pixels: the paper's ±10 px at 256, scaled with the image."""
    return max(1, math.floor(10 * image_size / 256 + 0.5))


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random integer shift (|d| <= max_shift, fill x = -1, i.e. no light), flip, 90° rotation.

    x: ``[B, C, N, N]`` on any device; each image gets its own draw from ``generator``
    (CPU), applied to the whole batch at once (one gather, one flip, three rotations), so
    it keeps up with a GPU. The 4 rotations times an optional flip cover the 8 symmetries
    of the square.
    """
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected [B, C, N, N], got {tuple(x.shape)}")
    b, c, n, _ = x.shape
    s = int(max_shift)
    rot = torch.randint(0, 4, (b,), generator=generator).to(x.device)
    flip = torch.randint(0, 2, (b,), generator=generator).to(x.device)
    shift = torch.randint(-s, s + 1, (b, 2), generator=generator).to(x.device)
    padded = torch.nn.functional.pad(x, (s, s, s, s), value=-1.0)
    ar = torch.arange(n, device=x.device)
    rows = (s - shift[:, 0])[:, None] + ar  # [B, N]
    cols = (s - shift[:, 1])[:, None] + ar
    p = n + 2 * s
    flat = (rows[:, :, None] * p + cols[:, None, :]).reshape(b, 1, n * n).expand(b, c, n * n)
    out = torch.gather(padded.reshape(b, c, p * p), 2, flat).reshape(b, c, n, n)
    out = torch.where(flip[:, None, None, None].bool(), out.flip(-1), out)
    for k in (1, 2, 3):
        sel = rot == k
        if bool(sel.any()):
            out[sel] = torch.rot90(out[sel], k, dims=(-2, -1))
    return out


# --------------------------------------------------------------------------- mock images
def mock_images(ids: Sequence[int] | np.ndarray, seed: int, cfg: PriorConfig) -> np.ndarray:
    """x-space mock galaxies ``[K, C, N, N]`` (float32), one per id, deterministic per (seed, id).

    Each galaxy's parameters and its sub-pixel centre offset (uniform in ±0.5 px)
    come from a generator seeded by ``[seed, id]``, so any subset can be rebuilt. The
    population is ``cfg.mock_structure`` ("smooth" or "realistic").
    """
    from d4a_batch.mock.galaxies import draw_galaxy, sample_params  # GalSim: only here

    out = np.empty((len(ids), cfg.in_channels, cfg.image_size, cfg.image_size), np.float32)
    for k, i in enumerate(np.asarray(ids, dtype=np.int64)):
        rng = np.random.default_rng([int(seed), int(i)])
        params = sample_params(rng, 1, cfg.mock_structure)[0]
        offset = tuple(rng.uniform(-0.5, 0.5, size=2))
        img = draw_galaxy(params, cfg.kpc_per_pixel, cfg.image_size, cfg.bands, offset)
        out[k] = to_model_space(img, cfg.stretch.a)
    return out


def mock_images_u8(ids: Sequence[int] | np.ndarray, seed: int, cfg: PriorConfig) -> np.ndarray:
    """``mock_images`` stored as 8 bits (``quantise_u8``): ``[K, C, N, N]`` uint8."""
    return quantise_u8(mock_images(ids, seed, cfg))


def mock_dataset(n_images: int, cfg: PriorConfig, seed: int, num_blocks: int | None = None):
    """Lazy Ray dataset of ``n_images`` mock galaxies: columns ``id`` and ``x`` [C, N, N]."""
    import ray.data

    def generate(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch[ID_COLUMN]
        return {ID_COLUMN: ids, X_COLUMN: mock_images(ids, seed, cfg)}

    ds = ray.data.range(n_images, override_num_blocks=num_blocks)
    return ds.map_batches(generate, batch_size=64, num_cpus=1)


def _arrow_fs(path: str | Path, storage_options: dict | None):
    """``(path, pyarrow filesystem or None)`` for Ray Data: URLs through fsspec with
    ``storage_options`` (as the survey engine reaches them), local paths as they are."""
    from d4a_batch.survey.storage import filesystem, has_scheme

    if not has_scheme(str(path)):
        return str(path), None
    import pyarrow.fs as pafs

    fs, inner = filesystem(str(path), storage_options)
    return inner, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def write_mock_parquet(
    path: str | Path,
    n_images: int,
    cfg: PriorConfig,
    seed: int,
    num_blocks: int | None = None,
    storage_options: dict | None = None,
) -> Path | str:
    """Generate ``n_images`` mocks with Ray and materialise them as Parquet under ``path``
    (a local folder, returned as a Path, or a URL reached with ``storage_options``)."""
    inner, fs = _arrow_fs(path, storage_options)
    mock_dataset(n_images, cfg, seed, num_blocks).write_parquet(inner, filesystem=fs)
    return path if fs is not None else Path(path)


def read_training_dataset(path: str | Path, storage_options: dict | None = None):
    """The Ray dataset of materialised training images (Parquet written by ``write_mock_parquet``).

    Read with Ray Data's V1 Parquet datasource: V2 first provisions a pool of 32
    ``FooterReader`` actors (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``) to index the footers,
    32 Python processes for the few files of a training set, which took over a minute on
    a loaded 2-core cluster. The context's flag is restored after the call.
    """
    import ray.data

    inner, fs = _arrow_fs(path, storage_options)
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(inner, filesystem=fs)
    finally:
        ctx.use_datasource_v2 = v2
