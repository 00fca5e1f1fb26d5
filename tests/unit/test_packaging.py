"""Shipped configuration files are valid for the tools that read them."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_ray_cluster_yaml_satisfies_rays_own_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # and with Ray's defaults filled in
    assert config["provider"]["type"] == "local"


def test_serve_config_names_the_builder_and_known_deployments() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(
        yaml.safe_load((ROOT / "serve_app" / "config.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "serve_app.app:build_app"
    names = {d.name for d in app.deployments}
    assert {"Gateway", "stages", "OutboxRelay", "NotificationDispatcher"} <= names
    for d in app.deployments:
        assert d.ray_actor_options.num_cpus < 1, f"{d.name} would take a whole core"


def test_plan_hosts_places_every_stage() -> None:
    from serve_app.app import plan_hosts
    from settings import Settings

    s = Settings()
    fused = plan_hosts(s, "fused")
    split = plan_hosts(s, "split")
    assert set(fused) == set(split) and "ack" not in fused
    assert set(fused.values()) == {"stages"} and all(k == v for k, v in split.items())


def test_build_app_is_a_builder_serve_accepts() -> None:
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve_app.app import build_app

    app = call_user_app_builder_with_args_if_necessary(build_app, {"topology": "split"})
    assert isinstance(app, Application)
