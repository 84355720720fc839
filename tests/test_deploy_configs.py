"""The deployment files (`cluster/`, `k8s/`) parse, are what their tools expect, and name the real CLI.

The Ray cluster launcher config is checked with Ray's own schema validation; the KubeRay RayJob
against the fields KubeRay requires; every `mmer merge` command written in them or their READMEs
is parsed by the CLI's own parser, so a renamed flag breaks this test rather than a cluster job.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from mmer_dist import cli

REPO = Path(__file__).resolve().parents[1]
CLUSTER_CONFIG = REPO / "cluster" / "ray-cluster.yaml"
RAYJOB = REPO / "k8s" / "rayjob-merge.yaml"
DOCKERFILE = REPO / "k8s" / "Dockerfile"
DOCS = [REPO / "cluster" / "README.md", REPO / "k8s" / "README.md", CLUSTER_CONFIG, RAYJOB]

_COMMAND = re.compile(r"(?:\bmmer|python -m mmer_dist\.cli) merge\b[^`\n]*")
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load_yaml(path: Path) -> dict:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{path}: expected one YAML mapping"
    return docs[0]


def merge_commands(text: str) -> list[str]:
    """Every concrete `mmer merge ...` command in a README or YAML file (shell continuations
    joined, comment markers dropped); prose mentions with `...` placeholders are skipped."""
    text = re.sub(r"\\\n\s*#?\s*", " ", text)
    found = []
    for match in _COMMAND.finditer(text):
        command = match.group(0).strip().rstrip(".,;:)")
        rest = command.split(" merge", 1)[1].strip()
        if not rest or "..." in rest:
            continue
        found.append(command)
    return found


def parse_merge(command: str):
    words = shlex.split(command)
    if words[0] == "mmer":
        argv = words[1:]
    else:
        assert words[:3] == ["python", "-m", "mmer_dist.cli"], command
        argv = words[3:]
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of saying "bad arguments"
        raise AssertionError(f"`{command}` is not accepted by the mmer CLI") from e


# -- the CLI the configs name ---------------------------------------------------------------------------


def test_mmer_console_script_is_the_cli():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mmer"] == "mmer_dist.cli:console_main"  # main(), then background threads stopped
    assert callable(cli.main) and callable(cli.console_main)
    assert "if __name__ == \"__main__\"" in (REPO / "mmer_dist" / "cli" / "__main__.py").read_text()  # python -m mmer_dist.cli


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_merge_command_in_the_deploy_files_parses(path):
    commands = merge_commands(path.read_text())
    assert commands, f"{path} shows no complete `mmer merge` command"
    for command in commands:
        args = parse_merge(command)
        assert args.command == "merge"
        assert args.backend == "ray" and args.address == "auto", command
        assert args.store.startswith(("s3://", "$PWD/", "/")), f"workers cannot reach a relative store: {command}"


def test_parser_rejects_what_it_should():
    """The check above is meaningful: unknown flags and bad values fail it."""
    with pytest.raises(AssertionError):
        parse_merge("mmer merge --store s3://b/s --backend ray --adress auto")
    with pytest.raises(AssertionError):
        parse_merge("mmer merge --store s3://b/s --backend spark")


def test_cluster_readme_submits_with_the_working_dir():
    text = (REPO / "cluster" / "README.md").read_text()
    submits = re.findall(r"ray job submit [^\n`]*", text)
    assert submits
    for line in submits:
        assert "--working-dir ." in line and " -- mmer merge " in line, line


# -- the Ray cluster launcher config ----------------------------------------------------------------------


def test_cluster_config_passes_rays_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(CLUSTER_CONFIG)
    validate_config(prepare_config(config))  # Ray's schema, after filling the provider's defaults

    bad = {**config, "head_node_typo": "head"}
    with pytest.raises(Exception):
        validate_config(prepare_config(bad))


def test_cluster_config_has_a_cpu_head_and_a_gpu_worker_group_that_installs_the_project():
    config = load_yaml(CLUSTER_CONFIG)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # the head runs the driver, not shard actors
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_groups = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        assert group["min_workers"] >= 1 and group["max_workers"] >= group["min_workers"]
        assert group["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4d.", "p5."))
    assert config["max_workers"] >= sum(t["min_workers"] for t in gpu_groups)

    # the repository is synced to every node and installed there, with s3fs for s3:// stores
    mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    setup = " && ".join(config["setup_commands"])
    assert "pip install" in setup and f"-e {mount}" in setup and "s3fs" in setup
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=0.0.0.0" in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start


# -- the KubeRay RayJob ---------------------------------------------------------------------------------


def _containers(template: dict) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def _secret_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def test_rayjob_has_what_kuberay_requires():
    job = load_yaml(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert _DNS_1123.match(job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 63
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values())  # Ray wants strings

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # map[string]string
    head_container = _containers(head["template"])[0]
    images = {head_container["image"]}

    groups = cluster["workerGroupSpecs"]
    assert groups
    gpus = 0
    for group in groups:
        assert _DNS_1123.match(group["groupName"])
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = _containers(group["template"])[0]
        images.add(container["image"])
        limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]  # k8s rule
        assert "cpu" in limits and "memory" in limits
        gpus += int(limits["nvidia.com/gpu"]) * group["replicas"]
    assert len(images) == 1, f"head and workers run different images: {images}"

    # the merge asks for no more shards than there are GPUs
    args = parse_merge(spec["entrypoint"])
    assert args.store.startswith("s3://")
    assert args.workers is not None and args.workers <= gpus


def test_rayjob_store_credentials_come_from_a_secret_on_head_and_workers():
    job = load_yaml(RAYJOB)
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        secret_env = _secret_env(_containers(template)[0])
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret_env), secret_env
        assert len(set(secret_env.values())) == 1


def test_ray_versions_agree_across_the_deploy_files():
    job = load_yaml(RAYJOB)
    version = job["spec"]["rayClusterSpec"]["rayVersion"]
    dockerfile = DOCKERFILE.read_text()
    assert f"rayproject/ray:{version}-" in dockerfile
    assert f"rayproject/ray:{version}-" in load_yaml(CLUSTER_CONFIG)["docker"]["image"]
    assert re.search(r"pip install [^\n]*-e \.", dockerfile)  # the image installs this project
    assert (REPO / "k8s" / "Dockerfile.dockerignore").exists()
