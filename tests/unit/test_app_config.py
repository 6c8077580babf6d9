"""``AppArgs.policy_config`` is checked where the app is built (``cmr serve``, ``serve deploy``,
KubeRay's ``serveConfigV2``), and a ``policy_config`` that the served checkpoint would override
is refused, not silently ignored. No Ray is started: validation runs before anything is deployed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cmr import checkpoint
from cmr.errors import ConfigError
from cmr.policies import make_policy
from services.config import AppArgs, load_args, read_config

ROOT = Path(__file__).resolve().parents[2]


def _serve_args(**policy) -> dict:
    """``applications[0].args`` of the repository's Serve config and KubeRay serveConfigV2, with
    ``policy`` fields replaced."""
    serve = read_config(ROOT / "cluster" / "serve.yaml")
    (svc,) = [d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "rayservice.yaml").read_text()) if d and d.get("kind") == "RayService"]
    kuberay = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    return [{**a, **policy} for a in (serve, kuberay)]


@pytest.mark.parametrize("policy_config, field", [({"lr": "fast"}, "lr"), ({"temperature": -1}, "temperature"), ({"lrr": 0.1}, "lrr")])
def test_policy_config_typo_fails_where_the_app_is_built(policy_config, field):
    from services.app import build_app

    for args in _serve_args(policy="carve", policy_config=policy_config):
        with pytest.raises(ConfigError, match=rf"field 'policy_config': CarveConfig: field '{field}'"):
            load_args(args, source="serveConfigV2")
        with pytest.raises(ConfigError, match=rf"^build_app args: field 'policy_config': CarveConfig: field '{field}'"):
            build_app(args)  # what `serve deploy` and KubeRay call
    # a valid config passes and is kept as given
    assert load_args({"policy": "carve", "policy_config": {"lr": 1e-3}}).policy_config == {"lr": 1e-3}


def _with_checkpoint(tmp_path, **config) -> AppArgs:
    from services.routing import checkpoint_root

    args = AppArgs(home=str(tmp_path), policy="knn", bench=None, tiny_models=False)
    checkpoint.save(checkpoint_root(args), make_policy("knn", config=config), {"offset": 0})
    return args


def test_policy_config_differing_from_the_checkpoint_is_refused(tmp_path):
    from services.routing import bootstrap, check_checkpoint_config

    args = _with_checkpoint(tmp_path, k=5, prior_weight=0.5)
    for same in ({}, {"k": 5}, {"k": 5, "prior_weight": 0.5}):  # nothing set, or what the checkpoint holds
        check_checkpoint_config(args.model_copy(update={"policy_config": same}))
    tuned = args.model_copy(update={"policy_config": {"k": 7, "prior_weight": 0.5}})
    with pytest.raises(ConfigError, match=r"field 'policy_config': k=7 \(checkpoint: 5\) differs from checkpoint v1 .*retrain.*cmr train --policy knn.*drop k from policy_config"):
        check_checkpoint_config(tuned)
    with pytest.raises(ConfigError, match="k=7"):
        bootstrap(tuned, encoder=None)  # the router's first step refuses it too, before writing anything
    assert not (tuned.state_dir() / "hub.sqlite").exists()


def test_cmr_serve_refuses_it_before_starting_ray(tmp_path, capsys):
    from cmr.cli import main

    _with_checkpoint(tmp_path, k=5)
    cfg = tmp_path / "chosen_serve.yaml"  # what `cmr tune` writes: policy + tuned policy_config
    cfg.write_text(yaml.safe_dump({"policy": "knn", "policy_config": {"k": 9}, "bench": None, "tiny_models": False}))
    code = main(["serve", "--config", str(cfg), "--home", str(tmp_path), "--open"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "k=9 (checkpoint: 5)" in err[0]
    import ray

    assert not ray.is_initialized()


def test_a_pool_backend_breaking_the_backend_policy_is_refused_naming_the_field():
    """Issue 14 (5): config goes through the same ``BackendPolicy`` as runtime registrations."""
    pool = {"name": "remote", "models": [{"id": "m", "engine": "openai", "base_url": "https://api.openai.com/v1", "api_key_env": "AWS_SECRET_ACCESS_KEY"}]}
    with pytest.raises(ConfigError, match=r"field 'pools\.0\.models\.0\.api_key_env': 'AWS_SECRET_ACCESS_KEY' is not an allowed key variable"):
        load_args({"pools": [pool]})
    pool["models"][0]["api_key_env"] = "OPENAI_API_KEY"
    with pytest.raises(ConfigError, match="api_key_env"):
        load_args({"pools": [pool]})
    assert load_args({"pools": [pool], "backends": {"key_envs": ["OPENAI_API_KEY"]}})  # allowed only when configured
    pool["models"][0]["api_key_env"] = "CMR_BACKEND_KEY_OPENAI"
    with pytest.raises(ConfigError, match=r"field 'pools\.0\.models\.0\.base_url': host 'api\.openai\.com' is not an allowed backend host"):
        load_args({"pools": [pool], "backends": {"hosts": ["llm.internal"]}})
    # the shipped cluster configs pass, with their host allow-list
    for args in _serve_args():
        assert load_args(args).backends.hosts == ["api.openai.com"]
