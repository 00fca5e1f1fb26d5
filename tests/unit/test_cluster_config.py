"""The cluster's Serve config (``serve_app/config.cluster.yaml``) stays deployable: valid for
Serve's own schema, its code shipped by a runtime_env Serve accepts, every deployment it
configures present in the application ``build_app`` builds from its args (so ``serve deploy``
applies each block to something), every stage host autoscaled with bounds, delays and a
queue limit, and no service address hard-coded (those come from the environment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "serve_app" / "config.cluster.yaml"
SERVICE_FIELDS = {"database_url", "jwks_url", "s3_endpoint", "s3_access_key", "s3_secret_key",
                  "smtp_host", "clamd_address", "bitrix_webhook_url", "storage_webhook_secret"}


def load() -> Any:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))


def built_deployment_names(args: dict[str, Any]) -> set[str]:
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app as serve_build

    from serve_app.app import build_app

    app = call_user_app_builder_with_args_if_necessary(build_app, args)
    return {d.name for d in serve_build(app, name="conveyor").deployments}


def test_cluster_config_satisfies_serves_schema_and_ships_the_code() -> None:
    config = load()
    (app,) = config.applications
    assert app.import_path == "serve_app.app:build_app" and app.route_prefix == "/"
    # Serve accepts only remote URIs here: the parse is the schema's own check above.
    assert app.runtime_env["working_dir"].endswith(".zip")
    assert config.proxy_location.value == "EveryNode"
    assert not SERVICE_FIELDS & set(app.args), "service addresses come from the environment"


def test_every_configured_deployment_exists_in_the_built_app(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import serve_app.app

    (app,) = load().applications
    monkeypatch.setattr(serve_app.app, "migrate_now", lambda settings: [])  # no database here
    built = built_deployment_names({**app.args, "data_dir": str(tmp_path)})
    configured = {d.name for d in app.deployments}
    assert configured == built, (configured ^ built)


def test_stage_hosts_autoscale_within_bounds_with_delays_and_queue_limits() -> None:
    (app,) = load().applications
    hosts = set(app.args["hosts"].values())
    assert hosts == {"messaging", "signals", "attachments"}
    by_name = {d.name: d for d in app.deployments}
    for name in hosts:
        d = by_name[name]
        auto = d.autoscaling_config
        assert auto is not None, name
        assert 1 <= auto["min_replicas"] < auto["max_replicas"], name
        assert auto["target_ongoing_requests"] > 0, name
        assert auto["upscale_delay_s"] < auto["downscale_delay_s"], name
        assert 0 < d.max_queued_requests and d.max_ongoing_requests >= auto["target_ongoing_requests"]
    gateway = by_name["Gateway"]
    assert gateway.num_replicas >= 2 and gateway.max_replicas_per_node == 1
    assert gateway.max_ongoing_requests >= 1000  # one slot per WebSocket


def test_cluster_config_gives_more_replicas_than_the_laptop_one() -> None:
    from ray.serve.schema import ServeDeploySchema

    laptop = ServeDeploySchema.model_validate(
        yaml.safe_load((ROOT / "serve_app" / "config.yaml").read_text())).applications[0]
    (cluster,) = load().applications

    def most(d: Any) -> int:
        auto, n = d.autoscaling_config, d.num_replicas  # unset: Serve's DEFAULT sentinel
        if isinstance(auto, dict):
            return int(auto["max_replicas"])
        return n if isinstance(n, int) else 1

    def total(app: Any) -> int:
        return sum(most(d) for d in app.deployments)

    assert total(cluster) > total(laptop)
