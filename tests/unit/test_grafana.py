"""The Grafana dashboard shipped with the k8s manifests: every query names a metric the code
exports (with Ray's ``ray_`` prefix and the right suffix for its kind), every exported metric is
on a panel, and kustomize ships it as a ConfigMap the Grafana sidecar picks up."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services import metrics

GRAFANA = Path(__file__).resolve().parents[2] / "k8s" / "base" / "grafana"
DASHBOARD = GRAFANA / "cmr-dashboard.json"
#: series Prometheus holds for each kind of Ray metric
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}
#: PromQL words that are not metric names
PROMQL = {"sum", "max", "min", "avg", "by", "without", "rate", "increase", "histogram_quantile", "le", "path", "model", "reason",
          "status", "role", "pool", "count", "irate", "topk"}


def exported_series() -> dict[str, str]:
    """Every Prometheus series name the code exports → the metric it belongs to."""
    out = {}
    for name in metrics.METRIC_NAMES:
        kind = metrics._SPECS[name][0]
        for s in SUFFIXES[kind]:
            out[f"ray_{name}{s}"] = name
    return out


def queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def names_in(expr: str) -> set[str]:
    """Identifiers of a PromQL expression outside strings, label matchers, ranges and legends."""
    bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', " ", expr)
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if w not in PROMQL and not w.startswith("$")}


def test_every_query_names_an_exported_metric():
    known = exported_series()
    qs = queries()
    assert qs
    for title, expr in qs:
        used = names_in(expr)
        assert used, f"{title}: no metric in {expr!r}"
        unknown = used - set(known)
        assert not unknown, f"panel {title!r}: {sorted(unknown)} not exported by services/metrics.py (exported: {sorted(known)})"


def test_every_exported_metric_is_on_the_dashboard():
    used = {exported_series()[n] for _, e in queries() for n in names_in(e)}
    assert used == set(metrics.METRIC_NAMES), sorted(set(metrics.METRIC_NAMES) - used)


def test_names_in_finds_what_a_wrong_query_names():
    # the check must be able to fail: a typo'd or unexported metric is reported
    assert names_in('sum by (model) (rate(ray_cmr_decision_total{model="a"}[5m]))') == {"ray_cmr_decision_total"}
    assert "ray_cmr_decision_total" not in exported_series()
    assert "ray_cmr_routing_latency_s_bucket" in exported_series() and "ray_cmr_decisions_total_bucket" not in exported_series()


def test_dashboard_is_a_configmap_for_the_grafana_sidecar():
    k = yaml.safe_load((GRAFANA / "kustomization.yaml").read_text())
    (gen,) = k["configMapGenerator"]
    assert gen["files"] == [DASHBOARD.name] and gen["options"]["labels"] == {"grafana_dashboard": "1"}
    base = yaml.safe_load((GRAFANA.parent / "kustomization.yaml").read_text())
    assert "grafana" in base["resources"]
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: cannot build the kustomize overlays")
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_ship_the_dashboard(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(GRAFANA.parents[1] / "overlays" / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (cm,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cmr-grafana-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"][DASHBOARD.name]) == json.loads(DASHBOARD.read_text())
