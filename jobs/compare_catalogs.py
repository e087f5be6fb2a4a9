"""Compare two output catalogs object by object (``python jobs/compare_catalogs.py A B``).

What a re-run or a code change changed: objects and columns only in one, per column how many
objects differ and by how much, status and flag changes. Its code is
``d4a_batch/cli/compare.py``.
"""

from __future__ import annotations

import sys

from d4a_batch.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
