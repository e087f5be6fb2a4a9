"""The maps of the code stay complete: every module is in docs/architecture.md and every job
in jobs/README.md (issue 32: ten of nineteen jobs were missing)."""

from __future__ import annotations

from d4a_batch.schema import REPO_ROOT

PACKAGE = REPO_ROOT / "d4a_batch"


def test_every_module_is_in_the_architecture_page():
    text = (REPO_ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(PACKAGE).with_suffix("")
        dotted = "d4a_batch." + ".".join(rel.parts)
        names = (f"`{path.name}`", dotted, rel.as_posix() + ".py")
        if not any(n in text for n in names):
            missing.append(str(path.relative_to(REPO_ROOT)))
    assert not missing, f"docs/architecture.md does not describe {missing}"


def test_every_job_is_in_the_jobs_readme():
    text = (REPO_ROOT / "jobs" / "README.md").read_text()
    jobs = sorted(p.name for p in (REPO_ROOT / "jobs").glob("*.py"))
    scripts = sorted(p.relative_to(REPO_ROOT / "jobs").as_posix()
                     for p in (REPO_ROOT / "jobs" / "configs").glob("*.sh"))  # fmt: skip
    missing = [j for j in jobs + scripts if j not in text]
    assert not missing, f"jobs/README.md does not describe {missing}"
