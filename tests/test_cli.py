"""The commands in ``[project.scripts]``: each names a real function whose ``--help`` works, and
``python jobs/<job>.py`` runs the same function."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from d4a_batch.schema import REPO_ROOT
from d4a_batch.testing import load_job

SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# the command -> the job file that runs the same main
JOB_FILES = {
    "d4a-deconvolve": "jobs/deconvolve_survey.py",
    "d4a-runs": "jobs/list_runs.py",
    "d4a-make-catalog": "jobs/make_catalog.py",
}


def _target(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_the_user_commands_are_declared():
    assert {"d4a-deconvolve", "d4a-runs", "d4a-make-catalog"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_command_has_a_working_help(name, capsys):
    main = _target(SCRIPTS[name])
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out


@pytest.mark.parametrize("name", sorted(JOB_FILES))
def test_the_job_file_runs_the_commands_main(name):
    module = load_job(Path(JOB_FILES[name]).stem)
    assert module.main is _target(SCRIPTS[name])


def test_a_job_file_runs_as_a_script():
    done = subprocess.run(
        [sys.executable, "jobs/list_runs.py", "--help"], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and "usage:" in done.stdout
