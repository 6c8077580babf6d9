"""cluster/ and the Dockerfile: the files a cluster runs, checked without a cluster.

``cluster/serve.yaml`` against Ray Serve's own config schema and ``AppArgs``; ``cluster/job.yaml``
as a Ray runtime environment; ``cluster/ray_job.py`` against a real (local) Ray cluster it must
join; the Dockerfile against pyproject.toml (extras, pins) and the paths it and the manifests use.
(docker itself cannot run here: no registry for base images.)
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SERVE_YAML = REPO / "cluster" / "serve.yaml"
RAY_JOB = REPO / "cluster" / "ray_job.py"


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(requirement_prefix: str) -> str:
    """The ``==`` version pyproject pins for a dependency (``torch``, ``ray[...]``)."""
    for dep in pyproject()["project"]["dependencies"]:
        if dep.startswith(requirement_prefix) and "==" in dep:
            return dep.split("==", 1)[1].strip()
    raise AssertionError(f"pyproject.toml pins no {requirement_prefix}")


# -- cluster/serve.yaml -------------------------------------------------------------------------------
def test_serve_yaml_is_a_valid_serve_config_of_the_app():
    from ray.serve.schema import ServeDeploySchema

    from services.config import load_args, read_config

    cfg = yaml.safe_load(SERVE_YAML.read_text())
    schema = ServeDeploySchema.model_validate(cfg)  # what `serve deploy` / KubeRay accept
    (app,) = schema.applications
    assert app.import_path == "services.app:build_app"
    # what `cmr serve --config cluster/serve.yaml` reads, and build_app is given
    args = load_args(read_config(SERVE_YAML), source=str(SERVE_YAML))
    assert args.to_dict() == load_args(app.args).to_dict()
    assert {p.name for p in args.pools} and args.learner.enabled
    # the import path and the gRPC servicer function exist where the config says
    module, _, attr = app.import_path.partition(":")
    tree = ast.parse((REPO / Path(*module.split("."))).with_suffix(".py").read_text())
    assert attr in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    for fn in cfg["grpc_options"]["grpc_servicer_functions"]:
        mod, _, name = fn.rpartition(".")
        assert re.search(rf"^def {name}\(", (REPO / Path(*mod.split("."))).with_suffix(".py").read_text(), re.M), fn


def test_serve_yaml_gpu_pools_ask_for_gpus():
    from services.config import load_args, read_config

    args = load_args(read_config(SERVE_YAML))
    for p in args.pools:
        if any(m.engine == "vllm" for m in p.models):
            assert float(p.ray_actor_options.get("num_gpus", 0)) >= 1, f"pool {p.name}: vLLM needs a GPU"


# -- cluster/job.yaml and ray_job.py -----------------------------------------------------------------
def test_job_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((REPO / "cluster" / "job.yaml").read_text()))
    assert env["working_dir"] == "."
    assert {"CMR_HOME", "CMR_DATA", "HF_HUB_OFFLINE"} <= set(env["env_vars"])


def test_ray_job_usage():
    r = subprocess.run([sys.executable, str(RAY_JOB), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ray job submit" in r.stdout
    r = subprocess.run([sys.executable, str(RAY_JOB)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2


@pytest.mark.ray
def test_ray_job_trains_on_the_running_cluster(tmp_path):
    """`ray_job.py train --ray` joins the cluster given by RAY_ADDRESS (as `ray job submit` sets
    it) instead of starting its own Ray, and writes loadable checkpoints."""
    from tests.unit.bench_data import write_cmrbench

    data = write_cmrbench(tmp_path / "bench")
    out = tmp_path / "ckpt"
    # RAY_AUTH_MODE=disabled: as a cluster from `ray start` without a token (ray.init's own local
    # cluster turns token auth on, with a token in ~/.ray that this test must not depend on)
    env = {**os.environ, "CMR_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    # a local one-node cluster in its own process: the job below is a second driver on it
    head = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(num_cpus=2, include_dashboard=False); "
         "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        address = head.stdout.readline().strip()
        assert re.fullmatch(r"[\d.]+:\d+", address), f"the head did not start: {address!r}"
        r = subprocess.run([sys.executable, str(RAY_JOB), "train", "--ray", "--policy", "knn", "--data", str(data), "--out", str(out),
                            "--experiences", "1"],
                           capture_output=True, text=True, timeout=300, env={**env, "RAY_ADDRESS": address}, cwd=REPO)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"Connecting to existing Ray cluster at address: {address}" in r.stderr
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary["experience"] == 1 and summary["ray_checkpoint"]
    finally:
        head.stdin.close()  # the head's ray.shutdown() at exit stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
    from cmr import checkpoint

    assert checkpoint.versions(out) == [1]
    checkpoint.open_checkpoint(out / "v000001")  # complete and checksummed


# -- Dockerfile -------------------------------------------------------------------------------------
def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """``{stage: [(INSTRUCTION, arguments), ...]}`` with line continuations joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    cur = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            cur = (m.group(2) or "").lower()
            stages[cur] = [("FROM", m.group(1))]
            continue
        stages[cur].append((instr, rest.strip()))
    return stages


def _run(stage: list[tuple[str, str]]) -> str:
    return " ; ".join(rest for instr, rest in stage if instr == "RUN")


def test_dockerfile_installs_the_declared_extras_and_pins():
    stages = dockerfile_stages()
    assert {"base", "cpu", "gpu"} <= set(stages)
    assert list(stages)[-1] == "cpu", "the default target (last stage) is the CPU image"
    extras = pyproject()["project"]["optional-dependencies"]
    # GPU variant: pip install of the project with the vllm and faiss-gpu extras, both declared
    m = re.search(r'pip install "?/opt/cmr\[([^\]]+)\]', _run(stages["gpu"]))
    assert m, "the gpu stage installs the project with extras"
    wanted = set(m.group(1).split(","))
    assert wanted == {"vllm", "faiss-gpu"} and wanted <= set(extras), wanted
    # the faiss swap names the package the faiss-gpu extra declares
    (faiss_gpu,) = extras["faiss-gpu"]
    assert re.match(r"[\w-]+", faiss_gpu).group(0) in _run(stages["gpu"])
    assert "pip uninstall -y faiss-cpu" in _run(stages["gpu"])
    # CPU variant: the project without extras, torch from the CPU index
    assert re.search(r"pip install /opt/cmr(\s|$)", _run(stages["cpu"]))
    assert "download.pytorch.org/whl/cpu" in " ".join(rest for _, rest in stages["cpu"])
    # pins: torch and ray as pyproject.toml has them, Python as requires-python allows
    base = " ".join(rest for _, rest in stages[""] + stages["base"])
    assert ("ARG", f"TORCH_VERSION={pinned('torch')}") in stages[""]  # global, before the first FROM
    for target in ("cpu", "gpu"):  # and declared again where it is used
        assert ("ARG", "TORCH_VERSION") in stages[target] and '"torch==${TORCH_VERSION}"' in _run(stages[target])
    assert pinned("ray[") == "2.60.0"
    for target in ("cpu", "gpu"):
        assert f"ray.__version__ == '{pinned('ray[')}'" in _run(stages[target])
    py = re.search(r"PYTHON_VERSION=(\d+\.\d+)", base).group(1)
    assert pyproject()["project"]["requires-python"] == f">={py}"
    assert stages["base"][0][1] == "python:${PYTHON_VERSION}-slim"
    for k in ("HF_HUB_OFFLINE=1", "CMR_HOME=/var/lib/cmr", "CMR_DATA=/data"):
        assert k in base


def test_dockerfile_paths_exist_and_match_the_manifests():
    stages = dockerfile_stages()
    workdir = [rest for instr, rest in stages["base"] if instr == "WORKDIR"]
    assert workdir == ["/opt/cmr"]
    for instr, rest in stages["base"]:
        if instr == "COPY":
            *srcs, dest = rest.split()
            assert dest == "/opt/cmr"
            assert all((REPO / s).exists() for s in srcs), srcs
    # what the image needs is not ignored by .dockerignore; the venv and run outputs are
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    needed = {"pyproject.toml", "README.md", "cmr", "services", "cluster", "tune", "bench"}
    assert not needed & ignored
    assert {".venv", "runs", ".git"} <= ignored
    for pkg in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pkg.rstrip("*") not in ignored
    # the RayJobs run /opt/cmr/cluster/ray_job.py: that is cluster/ray_job.py in the image
    for f in (REPO / "k8s" / "base").glob("rayjob-*.yaml"):
        entry = yaml.safe_load(f.read_text())["spec"]["entrypoint"]
        path = entry.split()[1]
        assert path.startswith("/opt/cmr/") and (REPO / path.removeprefix("/opt/cmr/")).is_file(), (f.name, path)


def test_dockerfile_and_ci_haproxy_checks_run_here():
    """The images' (and .ci/run's) HAProxy check is plain Python against this tree: it must name
    functions that exist (it named a module they had moved out of, which would fail every build)."""
    import subprocess
    import sys

    stages = dockerfile_stages()
    checks = [c for t in ("cpu", "gpu") for c in re.findall(r'python -c "([^"]*haproxy_problem[^"]*)"', _run(stages[t]))]
    checks += re.findall(r"python -c '([^']*haproxy_problem[^']*)'", (REPO / ".ci" / "run").read_text())
    assert len(checks) == 4, checks
    for code in checks:
        # the bundled HAProxy may be unusable on a machine (the check then exits non-zero), but the
        # code must import and call what it names
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert "AttributeError" not in r.stderr and "ImportError" not in r.stderr and "NameError" not in r.stderr, r.stderr
