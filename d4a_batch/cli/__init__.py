"""The commands a user runs (``[project.scripts]`` in pyproject.toml); ``jobs/*.py`` call them.

- ``d4a-deconvolve`` = ``python jobs/deconvolve_survey.py``: :mod:`d4a_batch.cli.deconvolve`
- ``d4a-runs`` = ``python jobs/list_runs.py``: :mod:`d4a_batch.cli.runs`
"""
