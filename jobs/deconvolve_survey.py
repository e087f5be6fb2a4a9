"""Deconvolve a HATS catalog of HSC galaxies with a diffusion prior (``python jobs/deconvolve_survey.py``).

The same command as ``d4a-deconvolve``; its code, options and exit codes are in
``d4a_batch/cli/deconvolve.py`` (``--help`` prints them).
"""

from __future__ import annotations

import sys

from d4a_batch.cli.deconvolve import (  # noqa: F401  (the job's names, for tests and callers)
    DEMO_OBJECTS,
    DEMO_SAMPLER,
    EXIT_CRASH,
    EXIT_JOB_ERROR,
    EXIT_LEASE_HELD,
    EXIT_OK,
    EXIT_PARTITIONS_FAILED,
    EXIT_TOO_MANY_ERRORS,
    MAX_ERROR_FRACTION,
    main,
    parse_args,
    run_config,
)

if __name__ == "__main__":
    sys.exit(main())
