"""The shipped cluster.yaml and Serve config are valid for the Ray version we pin."""
from pathlib import Path

import yaml

from deployments.args import AppArgs

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_validates_and_its_args_parse():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "deployments" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(raw)
    app = schema.applications[0]
    assert app.import_path == "deployments.app:build_app"
    args = AppArgs.model_validate(app.args)
    options = args.replica_options(cluster_gpus=0)
    assert options["autoscaling_config"]["max_replicas"] > options["autoscaling_config"][
        "min_replicas"]
    assert options["ray_actor_options"]["num_gpus"] == 1


def test_multi_gpu_serve_config_asks_for_one_node_of_four_gpu_bundles_per_replica():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "deployments" / "serve_config_multi_gpu.yaml").read_text())
    args = AppArgs.model_validate(ServeDeploySchema.parse_obj(raw).applications[0].args)
    options = args.replica_options(cluster_gpus=8)
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert [b["GPU"] for b in options["placement_group_bundles"]] == [1, 1, 1, 1]
    assert options["ray_actor_options"]["num_gpus"] == options["placement_group_bundles"][0]["GPU"]
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert config["available_node_types"]["worker.gpu8"]["resources"]["GPU"] == 8


def test_cluster_yaml_validates_against_the_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does before touching AWS
    worker = config["available_node_types"]["worker.gpu"]
    assert worker["resources"]["GPU"] >= 1 and worker["max_workers"] > worker["min_workers"]
    assert config["provider"]["type"] == "aws"
    assert all("IamInstanceProfile" in t["node_config"]
               for t in config["available_node_types"].values())
    assert any("pip install" in c and "moeplex" in c for c in config["setup_commands"])


def test_cluster_nodes_start_ray_with_the_environment_serve_run_gets():
    from deployments.app import HAPROXY_ENV_DEFAULTS, RAY_ENV_DEFAULTS

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in config[key] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assignments = dict(word.split("=", 1) for word in command.split("ray start")[0].split()
                           if "=" in word and word.split("=", 1)[0].isupper())
        assert assignments == {**RAY_ENV_DEFAULTS, **HAPROXY_ENV_DEFAULTS}
