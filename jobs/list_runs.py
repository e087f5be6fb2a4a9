"""List the runs recorded in an output catalog's ledger (``python jobs/list_runs.py OUTPUT``).

The same command as ``d4a-runs``; its code is ``d4a_batch/cli/runs.py``.
"""

from __future__ import annotations

import sys

from d4a_batch.cli.runs import main

if __name__ == "__main__":
    sys.exit(main())
