"""The scheduling files (jobs/k8s/*.yaml, jobs/cron.example) against the job's real CLI and pins.

No Ray, no cluster: the YAML is parsed, the job's entrypoint goes through the job's own
argparse parser, the Ray version through pyproject.toml's pin, and the RayJob field names
through the KubeRay ray.io/v1 API (RayJobSpec, RayClusterSpec, head and worker group specs).
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from d4a_batch.survey.storage import is_absolute
from d4a_batch.testing import load_job

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "deconvolve_survey.py"
RAYJOB = ROOT / "jobs" / "k8s" / "rayjob.yaml"
CRONJOB = ROOT / "jobs" / "k8s" / "cronjob.yaml"
CRON_EXAMPLE = ROOT / "jobs" / "cron.example"
JOB_COMMAND = ["python", "jobs/deconvolve_survey.py"]

# json field names of the KubeRay ray.io/v1 types (ray-operator/apis/ray/v1)
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}  # fmt: skip
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
    "autoscalerOptions", "headServiceAnnotations", "suspend",
}  # fmt: skip
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
    "template", "scaleStrategy", "suspend",
}  # fmt: skip
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}

# minute, hour, day of month, month, day of week (0 and 7 are Sunday)
CRON_FIELDS = (
    (0, 59, ()),
    (0, 23, ()),
    (1, 31, ()),
    (1, 12, ("jan feb mar apr may jun jul aug sep oct nov dec").split()),
    (0, 7, ("sun mon tue wed thu fri sat").split()),
)


def _cron_value(token: str, lo: int, names: tuple[str, ...] | list[str]) -> int | None:
    if token.isdigit():
        return int(token)
    if token.lower() in names:
        return list(names).index(token.lower()) + lo
    return None


def valid_cron(expr: str) -> bool:
    """True for a standard 5-field cron expression (lists, ranges, steps, month/day names)."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi, names) in zip(fields, CRON_FIELDS):
        for part in field.split(","):
            m = re.fullmatch(r"(?:\*|(\w+)(?:-(\w+))?)(?:/(\d+))?", part)
            if m is None or (m[3] is not None and int(m[3]) < 1):
                return False
            if m[1] is None:
                continue
            first = _cron_value(m[1], lo, names)
            last = first if m[2] is None else _cron_value(m[2], lo, names)
            if first is None or last is None or not lo <= first <= last <= hi:
                return False
    return True


@pytest.mark.parametrize(
    ("expr", "ok"),
    [
        ("0 2 * * *", True),
        ("*/15 0-6,22-23 1 jan-mar mon-fri", True),
        ("30 3 * * 7", True),
        ("0 2 * *", False),
        ("0 2 * * * *", False),
        ("60 2 * * *", False),
        ("0 24 * * *", False),
        ("0 2 0 * *", False),
        ("0 2 * 13 *", False),
        ("0 2 * * 8", False),
        ("0 6-2 * * *", False),
        ("*/0 2 * * *", False),
        ("@daily", False),
    ],
)
def test_cron_validator(expr, ok):
    assert valid_cron(expr) is ok


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def job():
    """jobs/deconvolve_survey.py as a module, imported from the file (jobs/ is not a package);
    it runs ``d4a_batch.cli.deconvolve`` (the ``d4a-deconvolve`` command)."""
    from d4a_batch.cli import deconvolve

    module = load_job("deconvolve_survey")
    assert module.main is deconvolve.main and module.parse_args is deconvolve.parse_args
    return deconvolve


@pytest.fixture(scope="module")
def parse_args(job):
    return job.parse_args


def _parse_job_args(parse_args, argv: list[str]):
    try:
        return parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"jobs/deconvolve_survey.py rejects {argv}: exit {exc.code}")


def _check_job_args(args) -> None:
    """A scheduled run: explicit inputs, outputs a cluster can reach, never --overwrite."""
    assert args.catalog and args.output and args.prior
    # under `ray job submit` the working directory is a temporary copy
    assert is_absolute(args.output) and is_absolute(args.prior)
    assert not args.overwrite, "--overwrite would delete the previous nights' catalog"


def _job_argv(command: str) -> list[str]:
    tokens = shlex.split(command)
    assert tokens[:2] == JOB_COMMAND, tokens[:2]
    return tokens[2:]


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = _load(RAYJOB)
    assert len(docs) == 1
    return docs[0]


@pytest.fixture(scope="module")
def cron_docs() -> list[dict]:
    return _load(CRONJOB)


def _ray_containers(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_rayjob_fields_are_kuberay_v1(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    # a new name for every `kubectl create`, so nights never collide
    assert rayjob["metadata"]["generateName"].endswith("-")
    assert "name" not in rayjob["metadata"]
    spec = rayjob["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, set(cluster) - RAYCLUSTER_SPEC_FIELDS
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
    # rayStartParams is a map[string]string
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_rayjob_lifecycle(rayjob):
    spec = rayjob["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    # a nightly run must end before the next night starts
    assert spec["activeDeadlineSeconds"] < 24 * 3600
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0


def test_rayjob_entrypoint_parses_with_the_job_cli(rayjob, parse_args):
    spec = rayjob["spec"]
    args = _parse_job_args(parse_args, _job_argv(spec["entrypoint"]))
    _check_job_args(args)
    # the relative script path resolves in the runtime env's working_dir (the repo in the image)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert Path(runtime_env["working_dir"]).is_absolute()


def test_ray_version_matches_pyproject_pin(rayjob):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [Requirement(d) for d in pyproject["project"]["dependencies"]]
    ray_pin = next(r for r in pins if r.name == "ray")
    version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert ray_pin.specifier.contains(version), (
        f"rayVersion {version} outside ray{ray_pin.specifier}"
    )


def test_cluster_shape(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        limits = container.get("resources", {}).get("limits", {})
        assert "nvidia.com/gpu" not in limits
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if any(
            int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["replicas"] >= 1
    # one image everywhere: the driver and the workers run the same code and Ray
    assert len({c["image"] for c in _ray_containers(rayjob)}) == 1


def _walk(node):
    """Every mapping in a parsed YAML tree."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_no_inline_secrets(rayjob, cron_docs):
    docs = [rayjob, *cron_docs]
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created out of band"
    for node in (n for d in docs for n in _walk(d)):
        if node.get("name") in SECRET_ENV:
            assert "value" not in node, f"{node['name']} has an inline value"
            assert "secretKeyRef" in node.get("valueFrom", {})
    for path in (RAYJOB, CRONJOB, CRON_EXAMPLE):
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", path.read_text()), path
    assert not re.search(r"secret|\"key\"", rayjob["spec"]["entrypoint"], re.IGNORECASE)
    # every Ray container (driver on the head, tasks on the workers) gets the credentials
    for container in _ray_containers(rayjob):
        from_secret = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
        from_keys = [
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        ]
        assert from_secret or from_keys, f"{container['name']} gets no S3 credentials"


def test_cronjob_schedule_and_policy(cron_docs, rayjob):
    cron = _one(cron_docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    assert valid_cron(spec["schedule"]), spec["schedule"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert isinstance(spec["startingDeadlineSeconds"], int) and spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    # the pod waits for the RayJob, so its own deadline must not cut the RayJob's short
    job = spec["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > rayjob["spec"]["activeDeadlineSeconds"]


def test_cronjob_rbac(cron_docs):
    account = _one(cron_docs, "ServiceAccount")["metadata"]["name"]
    role = _one(cron_docs, "Role")
    binding = _one(cron_docs, "RoleBinding")
    cron = _one(cron_docs, "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    verbs = {
        verb
        for rule in role["rules"]
        if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]
        for verb in rule["verbs"]
    }
    # create it, watch it to the end, prune old ones
    assert {"create", "get", "list", "delete"} <= verbs


def test_cronjob_creates_this_rayjob(cron_docs, rayjob):
    """The CronJob mounts the ConfigMap made from rayjob.yaml and `kubectl create`s that file."""
    pod = _one(cron_docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = "\n".join(container.get("command", []) + container.get("args", []))
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = container["volumeMounts"]
    config_map = volumes[mount["name"]]["configMap"]
    (item,) = config_map["items"]
    manifest = f"{mount['mountPath']}/{item['path']}"
    assert f"kubectl create -f {manifest}" in script
    # the ConfigMap is made from jobs/k8s/rayjob.yaml with that name and key
    recipe = re.search(
        r"kubectl create configmap (\S+) --from-file=(\S+)=(\S+)", CRONJOB.read_text()
    )
    assert recipe is not None, "cronjob.yaml does not say how its ConfigMap is made"
    assert recipe.group(1) == config_map["name"]
    assert recipe.group(2) == item["key"]
    assert (ROOT / recipe.group(3)).resolve() == RAYJOB.resolve()
    # the script finds the survey RayJobs by the labels rayjob.yaml sets
    selector = re.search(r"sel=(\S+)=(\S+)", script)
    assert selector is not None
    assert rayjob["metadata"]["labels"][selector.group(1)] == selector.group(2)


def test_cron_example(parse_args):
    lines = [
        line
        for line in CRON_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(lines) == 1, lines
    fields = lines[0].split(maxsplit=5)
    assert valid_cron(" ".join(fields[:5])), fields[:5]
    command = fields[5]
    assert "%" not in command.replace("\\%", ""), "an unescaped % ends a crontab command"
    submit, sep, job = command.partition(" -- ")
    assert sep, "no `--` between `ray job submit` and the job"
    # the lock is held while `ray job submit` follows the job to its end
    assert re.search(r"\bflock -n\b.*\bray job submit\b", submit), submit
    submit_args = shlex.split(submit[submit.index("ray job submit") :])
    assert submit_args[submit_args.index("--address") + 1].startswith("http://")
    assert submit_args[submit_args.index("--working-dir") + 1] == "."
    job = re.sub(r"\s*(>>?\s*\S+)?(\s+2>&1)?\s*$", "", job)
    args = _parse_job_args(parse_args, _job_argv(job))
    _check_job_args(args)


@pytest.mark.parametrize("path", [RAYJOB, CRON_EXAMPLE, ROOT / "jobs" / "README.md"])
def test_documented_exit_codes_match_the_job(path, job):
    text = " ".join(path.read_text().replace("#", " ").split())
    documented = {
        "EXIT_OK": r"(\d) all partitions ok",
        "EXIT_PARTITIONS_FAILED": r"(\d) some partitions failed",
        "EXIT_JOB_ERROR": r"(\d) job-level error",
        "EXIT_CRASH": r"(\d) unexpected crash",
        "EXIT_LEASE_HELD": r"(\d) output busy",
        "EXIT_TOO_MANY_ERRORS": r"(\d) too many error rows",
    }
    for name, pattern in documented.items():
        m = re.search(pattern, text)
        assert m is not None, f"{path.name} does not document {name}"
        assert int(m[1]) == getattr(job, name), (
            f"{path.name}: {m[0]!r} but {name} = {getattr(job, name)}"
        )
