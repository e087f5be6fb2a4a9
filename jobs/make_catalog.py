"""Make a HATS input catalog from a table of your own cutout and PSF files.

``python jobs/make_catalog.py TABLE --output DIR`` (the same command as
``d4a-make-catalog``; its code and documentation: ``d4a_batch/survey/make_catalog.py``).
"""

from __future__ import annotations

import sys

from d4a_batch.survey.make_catalog import main

if __name__ == "__main__":
    sys.exit(main())
