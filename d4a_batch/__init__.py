"""d4a-batch: survey-scale Bayesian deconvolution of galaxy images with a diffusion prior, on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("d4a-batch")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"
