"""k8s/: the KubeRay manifests as CI sees them, with no cluster.

Every overlay is built with ``kubectl kustomize`` (offline); every RayService / RayJob /
RayCluster is validated against the ``openAPIV3Schema`` of the KubeRay CRDs in
``../shared/kuberay-crds`` (fields the schema does not list are errors, as the API server would
prune or reject them); core kinds against the Kubernetes JSON schemas that ``kubernetes-validate``
ships (strict variant, offline); each ``serveConfigV2`` against Ray Serve's own config schema and
the app's ``AppArgs``; and the references between resources (volumes, claims, config maps, ports,
images, job entrypoints) against each other. Deliberately broken manifests must fail with a
message that names the field.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

from cmr import constants  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUBECTL = shutil.which("kubectl")
#: Kubernetes version whose core schemas the manifests must satisfy (kubernetes-validate ships them)
K8S_VERSION = "1.32.0"
#: the CRD files are ~1 MB of YAML each: libyaml reads them ~10x faster than the pure-Python loader
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
RAY_KINDS = {"RayService": "rayservices", "RayJob": "rayjobs", "RayCluster": "rayclusters"}

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed: cannot build the kustomize overlays")


# -- schemas ---------------------------------------------------------------------------------------
def crd_dir() -> Path:
    """``../shared/kuberay-crds`` beside the repo (CI copies shared/ there), via ``CMR_DATA``'s parent."""
    return constants.data_root().parent / "kuberay-crds"


def strict_schema(s: dict[str, Any]) -> dict[str, Any]:
    """A CRD's OpenAPI v3 structural schema as JSON Schema, with the API server's reading of it.

    ``x-kubernetes-int-or-string`` → integer or string; ``nullable`` → null allowed;
    ``x-kubernetes-preserve-unknown-fields`` → unknown fields kept; otherwise an object that lists
    ``properties`` admits no others (the server prunes them, ``kubectl apply`` rejects them with
    ``--validate=strict``: either way a misspelled field is silently lost). CEL rules
    (``x-kubernetes-validations``) are not evaluated.
    """
    out: dict[str, Any] = {}
    for k, v in s.items():
        if k == "properties":
            out[k] = {name: strict_schema(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = strict_schema(v)
        elif k in ("allOf", "anyOf", "oneOf"):
            out[k] = [strict_schema(x) for x in v]
        elif k.startswith("x-kubernetes-") or k in ("nullable", "description", "default", "format", "example"):
            continue
        else:
            out[k] = v
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def core_definitions() -> tuple[Any, str]:
    """The registry of kubernetes-validate's strict definitions for ``K8S_VERSION``, and its dir."""
    kv = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import all_versions
    from referencing import Registry, Resource

    mm = tuple(int(x) for x in K8S_VERSION.split(".")[:2])
    version = [v for v in all_versions() if tuple(int(x) for x in v.split(".")[:2]) <= mm][-1]
    folder = resources.files(kv.__name__) / "kubernetes-json-schema" / f"v{version}-local-strict"
    defs = json.loads((folder / "_definitions.json").read_text())
    return Resource.from_contents(defs) @ Registry(), str(folder)


OBJECT_META = {"$ref": "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}


@lru_cache(maxsize=None)
def ray_validator(kind: str, api_version: str):
    """Validator of one KubeRay kind at one served version, from the CRD file."""
    path = crd_dir() / f"ray.io_{RAY_KINDS[kind]}.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {crd_dir()} (../shared/kuberay-crds)")
    crd = yaml.load(path.read_text(), Loader=YAML_LOADER)
    group, _, version = api_version.partition("/")
    assert group == crd["spec"]["group"], f"{kind}: apiVersion {api_version}: the CRD's group is {crd['spec']['group']}"
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind}: apiVersion {api_version} is not served by the CRD (served: {sorted(served)})"
    schema = strict_schema(served[version]["schema"]["openAPIV3Schema"])
    # the API server checks an object's own metadata as ObjectMeta (the CRD leaves it open)
    schema["properties"]["metadata"] = OBJECT_META
    registry, _ = core_definitions()
    return jsonschema.Draft202012Validator(schema, registry=registry)


@lru_cache(maxsize=None)
def core_validator(kind: str, api_version: str):
    """Validator of one core kind (Service, PersistentVolumeClaim, ConfigMap, ...)."""
    registry, folder = core_definitions()
    # kubernetes-validate's file names: v1 -> v1, apps/v1 -> apps-v1, rbac.authorization.k8s.io/v1 -> rbac-v1
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    f = Path(folder) / f"{kind.lower()}-{group_version}.json"
    assert f.is_file(), f"no Kubernetes {K8S_VERSION} schema for {kind} {api_version}"
    return jsonschema.Draft202012Validator(json.loads(f.read_text()), registry=registry)


def field_path(err) -> str:
    """``spec.rayClusterConfig.workerGroupSpecs[0].replicas``: where a schema error is; for an
    unknown field, the field itself."""
    out = ""
    for p in err.absolute_path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        if extra:
            out += f".{extra[0]}" if out else extra[0]
    return out or "(root)"


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema error of one resource, as ``Kind/name: field.path: message`` lines."""
    kind, api = doc.get("kind"), doc.get("apiVersion", "")
    v = ray_validator(kind, api) if kind in RAY_KINDS else core_validator(kind, api)
    name = (doc.get("metadata") or {}).get("name", "?")
    errs = sorted(v.iter_errors(doc), key=jsonschema.exceptions.relevance)
    lines = []
    for e in errs:
        if e.validator in ("anyOf", "oneOf") and e.context:  # say which branch came closest
            e = jsonschema.exceptions.best_match(e.context)
        lines.append(f"{kind}/{name}: {field_path(e)}: {e.message[:200]}")
    return lines


# -- building ----------------------------------------------------------------------------------------
def kustomize(path: Path) -> list[dict[str, Any]]:
    r = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"kubectl kustomize {path} failed:\n{r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@lru_cache(maxsize=None)
def _built(overlay: str) -> str:
    return yaml.safe_dump_all(kustomize(K8S / "overlays" / overlay))


def built(overlay: str) -> list[dict[str, Any]]:
    """The overlay's resources (a fresh copy per call: tests may mutate them)."""
    return [d for d in yaml.safe_load_all(_built(overlay)) if d]


def of_kind(docs, kind) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, pod spec) of every Ray node a RayService / RayJob / RayCluster starts."""
    spec = doc["spec"]
    rc = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
    yield "head", rc["headGroupSpec"]["template"]["spec"]
    for g in rc.get("workerGroupSpecs", []):
        yield g["groupName"], g["template"]["spec"]


def serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def cluster_serve_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())


# -- tests -------------------------------------------------------------------------------------------
def test_there_are_cpu_gpu_and_postgres_overlays():
    assert {"cpu", "gpu", "postgres"} <= set(OVERLAYS)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_every_resource_validates(overlay):
    docs = built(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "RayJob", "PersistentVolumeClaim", "Service", "ConfigMap"} <= kinds
    errors = [line for d in docs for line in schema_errors(d)]
    assert not errors, "\n".join(errors)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_the_apps_config(overlay):
    """serveConfigV2: valid for Ray Serve (its own schema), the same import path as
    cluster/serve.yaml, and args that AppArgs accepts (what build_app will be given)."""
    from ray.serve.schema import ServeDeploySchema

    from services.config import load_args

    ref = cluster_serve_yaml()["applications"][0]
    for svc in of_kind(built(overlay), "RayService"):
        cfg = serve_config(svc)
        ServeDeploySchema.model_validate(cfg)
        (app,) = cfg["applications"]
        assert app["import_path"] == ref["import_path"] == "services.app:build_app"
        args = load_args(app["args"], source=f"{overlay}: serveConfigV2")
        assert args.home == "/var/lib/cmr" and args.bench and args.bench.startswith("/data/")


@needs_kubectl
def test_base_serve_config_is_cluster_serve_yaml():
    """One app description: the base RayService serves exactly what `serve deploy cluster/serve.yaml` does."""
    (svc,) = of_kind(kustomize(K8S / "base"), "RayService")
    assert serve_config(svc) == cluster_serve_yaml()


@needs_kubectl
def test_gpu_overlay_has_a_gpu_group_for_its_vllm_pool():
    from services.config import load_args

    (svc,) = of_kind(built("gpu"), "RayService")
    args = load_args(serve_config(svc)["applications"][0]["args"])
    gpu_pools = [p for p in args.pools if float(p.ray_actor_options.get("num_gpus", 0)) > 0]
    assert gpu_pools and any(m.engine == "vllm" for p in gpu_pools for m in p.models)
    groups = {g["groupName"]: g for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    gpu = groups["gpu"]
    (c,) = gpu["template"]["spec"]["containers"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert gpu["maxReplicas"] >= 1
    # the GPU image (Dockerfile target gpu) on the GPU group, the CPU image elsewhere
    images = {name: spec["containers"][0]["image"] for name, spec in pod_specs(svc)}
    assert images["gpu"] != images["head"] == images["cpu"]


@needs_kubectl
def test_cpu_overlay_asks_for_no_gpu():
    from services.config import load_args

    docs = built("cpu")
    assert "nvidia.com/gpu" not in json.dumps(docs)
    for svc in of_kind(docs, "RayService"):
        assert [g["groupName"] for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == ["cpu"]
        args = load_args(serve_config(svc)["applications"][0]["args"])
        assert args.pools
        for p in args.pools:
            assert float(p.ray_actor_options.get("num_gpus", 0)) == 0, p.name
            assert all(m.engine != "vllm" for m in p.models), p.name


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_between_resources_resolve(overlay):
    """What no schema checks: every volume's claim, every config map, every image is there;
    every Ray pod mounts CMR_HOME; the Services reach the ports Serve listens on."""
    from importlib.metadata import version

    docs = built(overlay)
    claims = {d["metadata"]["name"] for d in of_kind(docs, "PersistentVolumeClaim")}
    maps = {d["metadata"]["name"]: d for d in of_kind(docs, "ConfigMap")}
    ray_docs = [d for d in docs if d["kind"] in RAY_KINDS]
    for d in ray_docs:
        rc = d["spec"].get("rayClusterConfig") or d["spec"].get("rayClusterSpec")
        assert rc["rayVersion"] == version("ray") == "2.60.0", d["metadata"]["name"]
        for group, spec in pod_specs(d):
            where = f"{d['kind']}/{d['metadata']['name']} {group}"
            vols = {v["name"]: v for v in spec.get("volumes", [])}
            for c in spec["containers"] + spec.get("initContainers", []):
                # the base names images `cmr` / `cmr-gpu`; an overlay must give them a registry and tag
                assert "/" in c["image"] and ":" in c["image"], f"{where}: image {c['image']} not set by the overlay"
                for m in c.get("volumeMounts", []):
                    assert m["name"] in vols, f"{where}: mount of unknown volume {m['name']}"
                for ref in c.get("envFrom", []):
                    assert ref["configMapRef"]["name"] in maps, f"{where}: unknown config map"
            for v in vols.values():
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, f"{where}: unknown claim"
            ray = spec["containers"][0]
            mounted = {m["mountPath"] for m in ray.get("volumeMounts", [])}
            env = {k: v for ref in ray.get("envFrom", []) for k, v in maps[ref["configMapRef"]["name"]]["data"].items()}
            assert env["CMR_HOME"] in mounted and env["CMR_DATA"] in mounted, f"{where}: CMR_HOME/CMR_DATA not on the volume"
    for svc in of_kind(docs, "RayService"):
        cfg = serve_config(svc)
        serve_ports = {cfg["http_options"]["port"], cfg["grpc_options"]["port"]}
        assert serve_ports == {8000, 9000}
        head = next(spec for g, spec in pod_specs(svc) if g == "head")
        assert serve_ports <= {p["containerPort"] for p in head["containers"][0]["ports"]}
        pod_labels = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
        # the front doors: the Services that select Serve pods (not e.g. the store's headless one)
        fronts = [s for s in of_kind(docs, "Service") if "ray.io/serve" in s["spec"].get("selector", {})]
        assert fronts
        assert {p["targetPort"] for s in fronts for p in s["spec"]["ports"]} == serve_ports
        for s in fronts:
            own = {k: v for k, v in s["spec"]["selector"].items() if not k.startswith("ray.io/")}
            assert own.items() <= pod_labels.items(), f"Service/{s['metadata']['name']} selects no RayService pod"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_entrypoints_are_valid_cmr_commands(overlay):
    """Each RayJob runs cluster/ray_job.py from the image's /opt/cmr with arguments that the real
    `cmr` parser accepts; their paths are on the shared volume."""
    from cmr.cli import build_parser

    parser = build_parser()
    # the subcommands argparse knows (it exposes them only through its subparsers action)
    commands = {name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}
    jobs = of_kind(built(overlay), "RayJob")
    assert {j["metadata"]["name"] for j in jobs} == {"cmr-train", "cmr-tune"}
    missing = []
    for job in jobs:
        # suspended: `kubectl apply` must not start a training run; resuming does
        assert job["spec"]["suspend"] is True and job["spec"]["shutdownAfterJobFinishes"] is True
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:2] == ["python", "/opt/cmr/cluster/ray_job.py"]
        assert (REPO / "cluster" / "ray_job.py").is_file()
        cmd = argv[2:]
        if cmd[0] not in commands:
            missing.append(cmd[0])
            continue
        ns = parser.parse_args(cmd)
        paths = [str(v) for k, v in vars(ns).items() if k in ("data", "out", "storage") and v is not None]
        assert paths and all(p.startswith(("/var/lib/cmr", "/data")) for p in paths), paths
        if cmd[0] == "train":
            # a retrain publishes a checkpoint of the policy the routers serve, under its root
            (svc,) = of_kind(built(overlay), "RayService")
            served = serve_config(svc)["applications"][0]["args"]["policy"]
            assert ns.policy == served and str(ns.out).endswith(f"/serve/checkpoints/{served}"), (ns.policy, ns.out, served)
    if missing:
        pytest.skip(f"`cmr {missing[0]}` is not in the CLI yet (issue 6, part A): its RayJob's arguments are unchecked")


@needs_kubectl
def test_head_waits_for_the_data_then_starts(tmp_path):
    """The head's init container, run here on a temp folder: it waits (saying how to copy the
    data) until the ready marker exists, then exits 0."""
    (svc,) = of_kind(built("cpu"), "RayService")
    (init,) = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["initContainers"]
    assert init["command"][:2] == ["bash", "-c"]
    script = init["command"][2].replace("/data/.ready", str(tmp_path / ".ready")).replace("sleep 10", "sleep 0.2")
    with pytest.raises(subprocess.TimeoutExpired) as waiting:
        subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=1)
    assert b"kubectl cp" in (waiting.value.stdout or b"")  # bytes, whatever text= says
    (tmp_path / ".ready").touch()
    assert subprocess.run(["bash", "-c", script], capture_output=True, timeout=10).returncode == 0



def ray_container(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["containers"][0]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_served_ray_pod_takes_the_store_from_the_secret(overlay):
    """CMR_STORE in the head and every worker of the RayService, from the Secret cmr-store (key
    dsn), not optional: a missing Secret stops the pod rather than starting it on SQLite."""
    (svc,) = of_kind(built(overlay), "RayService")
    for group, spec in pod_specs(svc):
        env = {e["name"]: e for e in ray_container(spec).get("env", [])}
        assert "CMR_STORE" in env, f"{group}: no CMR_STORE"
        ref = env["CMR_STORE"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"], ref.get("optional", False)) == ("cmr-store", "dsn", False), f"{group}: {ref}"
    # the Secret of a managed database is the operator's, never in the repository: only the
    # try-out overlay with the in-cluster PostgreSQL ships one
    secrets = {d["metadata"]["name"] for d in of_kind(built(overlay), "Secret")}
    assert ("cmr-store" in secrets) == (overlay == "postgres"), secrets


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_replicas_spread_over_worker_pods(overlay):
    """At least 2 Router replicas, at most one per Ray node (Serve's max_replicas_per_node), and
    enough CPU worker pods (the head has num-cpus 0) to hold them all from the start."""
    from services.config import load_args

    (svc,) = of_kind(built(overlay), "RayService")
    (app,) = serve_config(svc)["applications"]
    args = load_args(app["args"])
    assert args.router_replicas >= 2 and not args.route_in_ingress  # routed by the spread Router replicas
    (router,) = [d for d in app.get("deployments", []) if d["name"] == "Router"]
    assert router["max_replicas_per_node"] == 1
    # an override of a deployment the app does not build would be ignored: Router is build_app's name
    assert 'serve.deployment(RouterDeployment, name="Router")' in (REPO / "services" / "app.py").read_text()
    rc = svc["spec"]["rayClusterConfig"]
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    need = float(args.router_actor_options["num_cpus"])
    fits = [g for g in rc["workerGroupSpecs"]
            if float(ray_container(g["template"]["spec"])["resources"]["limits"]["cpu"]) >= need]
    assert sum(min(g["replicas"], g["minReplicas"]) for g in fits) >= args.router_replicas


@needs_kubectl
def test_in_cluster_postgres_is_what_the_dsn_names():
    """The try-out store: the DSN in cmr-store reaches the StatefulSet's pod through its headless
    Service with the user, database and password the pod is initialised with; its volume is
    ReadWriteOnce (the state needs no shared volume); the image is the official postgres one."""
    from urllib.parse import urlsplit

    from cmr.state import check_store

    docs = built("postgres")
    (secret,) = [d for d in of_kind(docs, "Secret") if d["metadata"]["name"] == "cmr-store"]
    (sts,) = of_kind(docs, "StatefulSet")
    (svc,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == sts["spec"]["serviceName"]]
    dsn = urlsplit(check_store(secret["stringData"]["dsn"]))
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["replicas"] == 1
    assert dsn.hostname == f"{sts['metadata']['name']}-0.{svc['metadata']['name']}"
    assert dsn.port == svc["spec"]["ports"][0]["port"] == 5432
    pod = sts["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert re.fullmatch(r"(docker\.io/(library/)?)?postgres:\d+", c["image"]), c["image"]
    env = {e["name"]: e for e in c["env"]}
    assert dsn.username == env["POSTGRES_USER"]["value"] and dsn.path == "/" + env["POSTGRES_DB"]["value"]
    ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "cmr-store" and dsn.password == secret["stringData"][ref["key"]]
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in c["ports"]}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert {m["name"] for m in c["volumeMounts"]} == {claim["metadata"]["name"]}
    # the front doors do not select it
    fronts = [s for s in of_kind(docs, "Service") if "ray.io/serve" in s["spec"].get("selector", {})]
    assert all(not (s["spec"]["selector"].items() <= pod["metadata"]["labels"].items()) for s in fronts)


# -- the checks catch mistakes --------------------------------------------------------------------
def _broken_overlay(tmp_path: Path, patch: list[dict[str, Any]], target: str = "RayService") -> list[dict[str, Any]]:
    """An overlay in tmp_path on top of the real base with one JSON patch, built."""
    (tmp_path / "patch.yaml").write_text(yaml.safe_dump(patch))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "base", tmp_path)],  # kustomize refuses absolute bases
        "patches": [{"path": "patch.yaml", "target": {"kind": target}}],
    }))
    return kustomize(tmp_path)


@needs_kubectl
def test_a_misspelled_field_fails_naming_it(tmp_path):
    docs = _broken_overlay(tmp_path, [{"op": "add", "path": "/spec/rayClusterConfig/headGroupSpec/template/spec/containers/0/imagePullPolcy",
                                       "value": "Always"}])
    (svc,) = of_kind(docs, "RayService")
    errors = schema_errors(svc)
    assert errors and any("spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].imagePullPolcy" in e for e in errors), errors


@needs_kubectl
def test_a_wrong_type_fails_naming_the_field(tmp_path):
    docs = _broken_overlay(tmp_path, [{"op": "replace", "path": "/spec/rayClusterConfig/workerGroupSpecs/0/replicas", "value": "two"}])
    (svc,) = of_kind(docs, "RayService")
    errors = schema_errors(svc)
    assert any(e.startswith("RayService/cmr: spec.rayClusterConfig.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'") for e in errors), errors


@needs_kubectl
def test_a_broken_rayjob_and_core_kind_fail_naming_the_field(tmp_path):
    docs = _broken_overlay(tmp_path, [{"op": "add", "path": "/spec/entrypointt", "value": "python x.py"}], target="RayJob")
    errors = [e for j in of_kind(docs, "RayJob") for e in schema_errors(j)]
    assert any(e.startswith("RayJob/cmr-train: spec.entrypointt:") for e in errors), errors
    (svc,) = [d for d in built("cpu") if d["kind"] == "Service" and d["metadata"]["name"] == "cmr-http"]
    svc["spec"]["ports"][0]["port"] = "http"
    svc["spec"]["selectr"] = {}
    errors = schema_errors(svc)
    assert any(e.startswith("Service/cmr-http: spec.ports[0].port:") for e in errors), errors
    assert any(e.startswith("Service/cmr-http: spec.selectr:") for e in errors), errors


def test_int_or_string_and_preserved_fields_follow_the_api_server():
    s = strict_schema({"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "free": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": True},
        "opt": {"type": "string", "nullable": True},
    }})
    v = jsonschema.Draft202012Validator(s)
    assert v.is_valid({"port": 8000}) and v.is_valid({"port": "http"}) and not v.is_valid({"port": 1.5})
    assert v.is_valid({"free": {"a": "x", "anything": 1}}) and not v.is_valid({"free": {"a": 1}})
    assert v.is_valid({"opt": None}) and not v.is_valid({"other": 1})


@needs_kubectl
def test_a_typo_in_serve_config_args_names_the_field():
    from services.config import ConfigError, load_args

    (svc,) = of_kind(built("cpu"), "RayService")
    cfg = serve_config(svc)
    cfg["applications"][0]["args"]["pools"][0]["ray_actor_option"] = {"num_cpus": 1}
    with pytest.raises(ConfigError, match=r"field 'pools\.0\.ray_actor_option'"):
        load_args(cfg["applications"][0]["args"], source="serveConfigV2")
