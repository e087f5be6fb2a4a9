"""The one module that owns output column names, flag bits, status values and paths.

Everything that writes or reads a column of the output catalog, tests a flag
bit, or builds a default path imports it from here.
"""

from __future__ import annotations

import enum
from pathlib import Path

# --------------------------------------------------------------------------- paths
REPO_ROOT = Path(__file__).resolve().parent.parent
PRIORS_DIR = REPO_ROOT / "priors"
DEMO_PRIOR_DIR = PRIORS_DIR / "demo-64"
CATALOGS_DIR = REPO_ROOT / "catalogs"
DEMO_SURVEY_DIR = CATALOGS_DIR / "demo" / "survey"  # built on first use, not committed
DEMO_OUTPUT_DIR = CATALOGS_DIR / "out" / "demo_posteriors"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

# prior artifact file names
PRIOR_WEIGHTS = "weights.safetensors"
PRIOR_CONFIG = "config.json"
PRIOR_STATS = "stats.safetensors"
PRIOR_CALIBRATION = "calibration.json"  # optional: interval scales (prior/calibration.py)

# run ledger / output metadata file names (next to the output catalog)
LEDGER_DIR = "_d4a_ledger"  # the run ledger (pipeline/ledger.py)
WORK_DIR = "_d4a_work"  # result chunks and partitions being committed, per run
LEASE_FILE = "_d4a_lease.json"  # the one writer's lease on an output (pipeline/lease.py)
RUN_CONFIG_FILE = "_d4a_run_config.json"
FIGURES_DIR = "_d4a_figures"  # per-object figures and the run report (pipeline/figures.py)
DATASET_DIR = "dataset"  # a HATS catalog's Parquet partitions


# --------------------------------------------------------------------------- status
class Status(enum.StrEnum):
    OK = "ok"  # sampled; flags may still be set
    ERROR = "error"  # input could not be used; see message; summaries are NaN


# --------------------------------------------------------------------------- flags
class Flag(enum.IntFlag):
    """Quality flags: one bit each. ``FLAG_REASONS`` says what each means."""

    PRIOR_DOMINATED = 1 << 0
    UPSAMPLING_HIGH = 1 << 1
    POOR_FIT = 1 << 2
    MASKED_FRACTION_HIGH = 1 << 3
    PSF_BAD = 1 << 4
    PHOTOZ_BAD = 1 << 5
    INPUT_ERROR = 1 << 6
    NOISE_ESTIMATED = 1 << 7  # image-only cutout: noise (and/or mask) estimated from the stamp
    BLENDED = 1 << 8  # a neighbour's light reaches the target's model footprint (detection.py)
    TRUNCATED = 1 << 9  # the target's light extends past the model footprint (detection.py)
    CORE_MISFIT = 1 << 10  # POOR_FIT with most excess chi2 at the core (quality/regions.py)


FLAG_REASONS: dict[Flag, str] = {
    Flag.PRIOR_DOMINATED: "variance ratio in the core above threshold: the prior, not the data, drives the image",
    Flag.UPSAMPLING_HIGH: "upsampling factor 0.168''/theta above limit: deconvolution unreliable",
    Flag.POOR_FIT: "reduced chi2 of the re-convolved posterior mean above threshold",
    Flag.MASKED_FRACTION_HIGH: (
        "fraction of unusable pixels (bad MASK bits, non-finite, off the cutout) in the model "
        "footprint above threshold; neighbour masking is not counted"
    ),
    Flag.PSF_BAD: "PSF missing, renormalised or off-centre",
    Flag.PHOTOZ_BAD: "photo-z missing, invalid or outside the prior's validity range",
    Flag.INPUT_ERROR: "input could not be read or used; see status_message",
    Flag.NOISE_ESTIMATED: "MASK and/or VARIANCE empty or absent: noise estimated from the stamp (sky from source-free pixels + source term), see flag_reasons",
    Flag.BLENDED: "the neighbours' light left on the used pixels, in noise units (the chi2/dof it adds to a perfect fit of the target), above threshold, or a neighbour merged into the target's segment: masking cannot remove it",
    Flag.TRUNCATED: "fraction of the target's flux (its point-symmetric light on its segment and Kron ellipse, so a merged neighbour does not count and faint outskirts do) outside the model footprint above threshold: the model field cuts the galaxy off",
    Flag.CORE_MISFIT: "POOR_FIT whose excess chi2 (sum of residual^2 - 1 on the used pixels) lies mostly within 1.5 PSF FWHM of the object: a core more compact than the prior reproduces (or a point source), or a PSF mismatch; the POOR_FIT reason gives every region's share",
}


def flag_names(bits: int) -> list[str]:
    """Names of the flags set in ``bits`` (lowest bit first)."""
    return [f.name for f in Flag if bits & f.value]


# --------------------------------------------------------------------------- output columns
class Col:
    """Output catalog column names."""

    # identity (copied from input)
    OBJECT_ID = "object_id"
    RA = "ra"
    DEC = "dec"
    HEALPIX = "_healpix_29"
    PHOTOZ = "photoz"
    # status
    STATUS = "status"
    MESSAGE = "status_message"
    FLAGS = "flags"
    FLAG_NAMES = "flag_names"
    FLAG_REASONS = "flag_reasons"
    # geometry
    THETA_ARCSEC = "model_pixel_arcsec"
    UPSAMPLING = "upsampling"
    N_OUT = "footprint_hsc_pixels"
    STAMP_SIZE = "stamp_size"
    # unusable pixels of the model footprint (all bands) in the cutout itself: bad MASK bits,
    # non-finite, outside the cutout; neighbour masking is not counted (MASKED_FRACTION_HIGH)
    MASKED_FRACTION = "masked_fraction"
    # neighbours and truncation (quality/detection.py, measured at staging)
    N_NEIGHBOURS_MASKED = "n_neighbours_masked"  # neighbour segments made invalid pixels
    NEIGHBOUR_MASKED_FRACTION = "neighbour_masked_fraction"  # stamp pixels masked for them
    BLEND_FRACTION = "blend_fraction"  # neighbour light on used footprint pixels / target's
    # the neighbours' light left on the used stamp pixels in noise units: the chi2/dof it
    # adds to a perfect fit of the target (BLENDED; quality/detection.py)
    CONTAMINATION = "contamination"
    ASYMMETRY = "asymmetry"  # target segment light with no point-mirror image / its flux
    TRUNCATED_FRACTION = "truncated_fraction"  # target segment flux outside the footprint
    # summaries (per band columns are f"{name}_{band}")
    # raw sampler variance / prior variance (not the calibrated one; sampling/summaries.py)
    HALLUCINATION = "hallucination_score"
    VARIANCE_RATIO_MEAN = "variance_ratio_mean"
    # calibrated intervals (prior/calibration.py; NaN without a matching calibration.json):
    # observed aperture S/N per pixel (sampling.calibrate.observed_snr), its S/N bin (float
    # index, NaN: none) and the lambdas of the 68/95 % intervals mean ± lambda·z_p·std_flux
    SNR = "snr_aperture"
    CALIB_BIN = "calib_snr_bin"
    CALIB_LAMBDA68 = "calib_lambda68"
    CALIB_LAMBDA95 = "calib_lambda95"
    CHI2 = "chi2_reduced"
    FLUX = "flux"  # per band: flux_{band} (counts, zp 27)
    FLUX_ERR = "flux_err"
    MAG = "mag"  # per band: mag_{band} (AB)
    MAG_ERR = "mag_err"
    ALPHA = "alpha"  # per band amplitude
    BETA = "beta"  # per band background
    # maps (tensor columns)
    MEAN_X = "mean_x"
    STD_X = "std_x"
    MEAN_FLUX = "mean_flux"
    STD_FLUX = "std_flux"
    VARIANCE_RATIO = "variance_ratio"
    HALFWIDTH68_FLUX = "halfwidth68_flux"  # calibrated half-width lambda68 · 0.994 · std_flux
    HALFWIDTH95_FLUX = "halfwidth95_flux"  # calibrated half-width lambda95 · 1.96 · std_flux
    SAMPLES_X = "samples_x"
    # morphology (d4a_batch/measure; definitions in measure/morphology.py): the measurement
    # band's (MEASURE_BAND) values from every posterior sample, summarised as the median
    # (the bare name) and the 16th/84th percentiles (pct_col(name, 16 | 84)); the same
    # measurement on the observed stamp as obs_col(name); r50 per band as band_col(R50_KPC, b)
    R20_KPC = "r20_kpc"
    R50_KPC = "r50_kpc"
    R80_KPC = "r80_kpc"
    R20_ARCSEC = "r20_arcsec"
    R50_ARCSEC = "r50_arcsec"
    R80_ARCSEC = "r80_arcsec"
    R_TOTAL_KPC = "r_total_kpc"  # the total-flux aperture: min(2 Petrosian radii, the field)
    CONCENTRATION = "concentration"  # 5 log10(r80 / r20)
    AXIS_RATIO = "axis_ratio"  # b/a from second moments
    POSITION_ANGLE = "pa_deg"  # major axis, degrees east of north, [0, 180)
    CENTROID_OFFSET_KPC = "centroid_offset_kpc"  # light centroid - catalog position
    CENTROID_OFFSET_ARCSEC = "centroid_offset_arcsec"
    CAS_ASYMMETRY = "cas_asymmetry"  # rotational, background-corrected (not ASYMMETRY above)
    GINI = "gini"
    M20 = "m20"
    COLOUR_GRADIENT = "colour_gradient_gi"  # (g - i) inside r50 minus outside, mag
    MEASURE_NOTES = "measure_notes"  # why a measurement is NaN (flag or measurement)
    # provenance
    RUN_ID = "run_id"
    PRIOR_ID = "prior_id"
    PRIOR_HASH = "prior_hash"
    CONFIG_HASH = "config_hash"
    CODE_VERSION = "code_version"
    SEED = "seed"
    STEPS = "steps"
    SAMPLES = "samples"
    CREATED = "created_utc"


def band_col(name: str, band: str) -> str:
    """Per-band column name, e.g. ``band_col(Col.FLUX, "i") == "flux_i"``."""
    return f"{name}_{band}"


# --------------------------------------------------------------------------- morphology
MEASURE_BAND = "i"  # the morphology columns' band (the last band when the prior has no i)
COLOUR_BANDS = ("g", "i")  # COLOUR_GRADIENT: (g - i) inside r50 minus outside r50
PERCENTILES = (16, 84)
# the morphology columns' base names, in catalog order (each with its percentile and
# observed-stamp columns; then r50 per band)
MORPHOLOGY = (
    Col.R20_KPC, Col.R50_KPC, Col.R80_KPC, Col.R20_ARCSEC, Col.R50_ARCSEC, Col.R80_ARCSEC,
    Col.R_TOTAL_KPC, Col.CONCENTRATION, Col.AXIS_RATIO, Col.POSITION_ANGLE,
    Col.CENTROID_OFFSET_KPC, Col.CENTROID_OFFSET_ARCSEC, Col.CAS_ASYMMETRY, Col.GINI, Col.M20,
    Col.COLOUR_GRADIENT,
)  # fmt: skip


def pct_col(name: str, percentile: int) -> str:
    """A posterior percentile column, e.g. ``pct_col(Col.R50_KPC, 16) == "r50_kpc_p16"``."""
    return f"{name}_p{int(percentile)}"


def obs_col(name: str) -> str:
    """The observed stamp's value, e.g. ``obs_col(Col.R50_KPC) == "r50_kpc_obs"``."""
    return f"{name}_obs"


def with_intervals(name: str) -> tuple[str, ...]:
    """A measurement's columns: median, 16th and 84th percentiles, observed value."""
    return (name, *(pct_col(name, p) for p in PERCENTILES), obs_col(name))


def morphology_columns(bands: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Every float morphology column of a catalog with ``bands``, in catalog order."""
    base = [*MORPHOLOGY, *(band_col(Col.R50_KPC, b) for b in bands)]
    return tuple(c for name in base for c in with_intervals(name))
