"""The Serve config (`serve/config.yaml`) and the KubeRay manifests (`k8s/*.yaml`) are what their
tools accept, and what the application takes.

- Both Serve configs (the local one and the RayService's `serveConfigV2`) pass Ray Serve's own
  `ServeDeploySchema`, and, since that schema ignores unknown keys on purpose (forward
  compatibility: a typo like `num_replica` would silently do nothing), no key is unknown to it;
  each application's `args` pass `serve.config.ServeOptions`; the application built from them the
  way Serve's deploy step builds it (`serve.app:build`, no Ray needed) has the deployments the
  config overrides, takes the override values, and fits the RayService's pods at its largest.
- The RayService and the RayJob pass the KubeRay v1.7.0 CRDs' OpenAPI schemas (vendored under
  k8s/schemas/, checked by tests/k8s_schema.py the way the API server checks them), and the checks
  KubeRay's operator makes beyond the schema.
- Every check is shown to fail on a broken copy.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import typing
from pathlib import Path

import k8s_schema
import pydantic
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve.config import ServeOptions

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serve" / "config.yaml"
RAYSERVICE = REPO / "k8s" / "rayservice.yaml"
RAYJOB = REPO / "k8s" / "rayjob-merge.yaml"
DOCKERFILE = REPO / "k8s" / "Dockerfile"
CRDS = REPO / "k8s" / "schemas" / "kuberay-v1.7.0"
RAYSERVICE_CRD = CRDS / "ray.io_rayservices.yaml"
RAYJOB_CRD = CRDS / "ray.io_rayjobs.yaml"

APP_NAME, IMPORT_PATH = "mmer", "serve.app:build"
DEPLOYMENTS = {"OpenAIIngress", "LLMEngine", "MediaEncoders"}  # the names serve.app binds
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_RAYSERVICE_NAME = 47  # KubeRay v1.7: 53 (RayCluster) - 6
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}


def load_yaml(path: Path) -> dict:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{path}: expected one YAML mapping"
    return docs[0]


def rayservice_serve_config(manifest: dict) -> dict:
    text = manifest["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML document in a string"
    return yaml.safe_load(text)


SERVE_CONFIGS = {
    "serve/config.yaml": lambda: load_yaml(SERVE_CONFIG),
    "k8s/rayservice.yaml serveConfigV2": lambda: rayservice_serve_config(load_yaml(RAYSERVICE)),
}


# -- Ray Serve's schema, strictly ----------------------------------------------------------------------


def _models_in(annotation) -> tuple[list[type[pydantic.BaseModel]], bool]:
    """The pydantic models an annotation may hold, and whether it also takes a plain dict."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation], False
    if annotation is dict or typing.get_origin(annotation) is dict:
        return [], True
    models, takes_dict = [], False
    for arg in typing.get_args(annotation):
        sub_models, sub_dict = _models_in(arg)
        models += sub_models
        takes_dict |= sub_dict
    return models, takes_dict


def unknown_keys(model: type[pydantic.BaseModel], data: dict, where: str = "") -> list[str]:
    """Keys of `data` that `model` (and the models nested in it) does not declare: Serve's schemas
    drop them without a word. A dict that the schema keeps untyped but Serve later turns into a
    model (`autoscaling_config`) is validated against that model here."""
    fields = {f.alias or name: f for name, f in model.model_fields.items()} | dict(model.model_fields)
    problems = []
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{where}{key}: not an option of {model.__name__}")
            continue
        models, takes_dict = _models_in(fields[key].annotation)
        for sub in models:
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    continue
                label = item.get("name", i)  # applications and deployments by name
                at = f"{where}{key}[{label}]." if isinstance(value, list) else f"{where}{key}."
                problems += unknown_keys(sub, item, at)
                if takes_dict:
                    try:
                        sub.model_validate(item)
                    except pydantic.ValidationError as e:
                        problems.append(f"{at[:-1]}: {e.errors()[0]['msg']}")
    return problems


def serve_config_problems(config: dict) -> list[str]:
    """What Ray Serve would reject (ServeDeploySchema) or silently ignore in a Serve config."""
    try:
        ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as e:
        return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    return unknown_keys(ServeDeploySchema, config)


def the_app(config: dict) -> dict:
    apps = config["applications"]
    assert [a["name"] for a in apps] == [APP_NAME]
    return apps[0]


def deployments(app: dict) -> dict[str, dict]:
    return {d["name"]: d for d in app.get("deployments", [])}


@pytest.mark.parametrize("which", SERVE_CONFIGS)
def test_serve_config_passes_ray_serves_schema(which):
    config = SERVE_CONFIGS[which]()
    assert serve_config_problems(config) == []
    app = the_app(config)
    assert app["import_path"] == IMPORT_PATH and app.get("route_prefix", "/") == "/"
    assert set(deployments(app)) <= DEPLOYMENTS, "Serve fails a deploy that names a deployment the app lacks"
    assert config["http_options"]["host"] == "0.0.0.0" and config["http_options"]["port"] == 8000


@pytest.mark.parametrize("which", SERVE_CONFIGS)
def test_application_args_are_serve_options(which):
    app = the_app(SERVE_CONFIGS[which]())
    ServeOptions.from_args(app["args"])  # InvalidInputError naming the field otherwise
    for name in ("LLMEngine", "MediaEncoders"):
        scaling = deployments(app)[name]["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] < scaling["max_replicas"], name
    # a second engine replica comes before the first one's batch is full, and stays
    engine = deployments(app)["LLMEngine"]["autoscaling_config"]
    assert engine["target_ongoing_requests"] < ServeOptions.from_args(app["args"]).max_running
    assert engine["downscale_delay_s"] >= 300, "a replica stopped loses its slots: scale down late"


# -- the application itself: what Serve does with the config at deploy time --------------------------


@functools.lru_cache(maxsize=None)
def _built(import_path: str, args_json: str) -> dict:
    """The application's deployments as Serve's build step makes them (no Ray needed): the
    builder called with the args, the bound graph flattened."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    app = call_user_app_builder_with_args_if_necessary(import_attr(import_path), json.loads(args_json))
    return {d.name: d for d in build_app(app, name=APP_NAME).deployments}


def built_deployments(app: dict) -> dict:
    return _built(app["import_path"], json.dumps(app["args"], sort_keys=True))


def override_problems(app: dict) -> list[str]:
    """What Serve's deploy step refuses in the config's deployment overrides: a deployment the app
    does not have, a value its DeploymentConfig does not take."""
    built, problems = built_deployments(app), []
    for name, override in deployments(app).items():
        if name not in built:
            problems.append(f"{name}: no such deployment (the app has {sorted(built)})")
            continue
        try:
            built[name].options(**{k: v for k, v in override.items() if k != "name"})
        except (pydantic.ValidationError, ValueError, TypeError) as e:
            problems.append(f"{name}: {e}")
    return problems


@pytest.mark.parametrize("which", SERVE_CONFIGS)
def test_config_overrides_fit_the_apps_deployments(which):
    app = the_app(SERVE_CONFIGS[which]())
    built = built_deployments(app)
    assert set(built) == DEPLOYMENTS
    assert override_problems(app) == []
    # the engine's concurrency is what serve.app derives from these args, stated where operators look
    engine = built["LLMEngine"]._deployment_config
    assert deployments(app)["LLMEngine"]["max_ongoing_requests"] == engine.max_ongoing_requests


def test_the_rayservices_user_config_goes_to_a_reconfigure_method():
    """Serve fails a replica whose deployment gets a user_config and has no `reconfigure`."""
    app = the_app(rayservice_serve_config(load_yaml(RAYSERVICE)))
    built = built_deployments(app)
    configured = [name for name, override in deployments(app).items() if override.get("user_config") is not None]
    assert configured == ["LLMEngine"]
    assert callable(getattr(built["LLMEngine"].func_or_class, "reconfigure", None)), \
        "LLMEngine gets a user_config but has no reconfigure method"


def _defaults(store: str) -> dict:
    # validated once more: pydantic does not run validators on defaults (slot_budget "2GB")
    return ServeOptions.model_validate(ServeOptions(store=store).model_dump()).model_dump()


def test_local_config_runs_the_defaults_on_a_local_store():
    app = the_app(load_yaml(SERVE_CONFIG))
    args = app["args"]
    assert args["store"] == "./mmer-store"
    assert ServeOptions.from_args(args).model_dump() == _defaults(args["store"])
    assert "user_config" not in deployments(app)["LLMEngine"]  # follows the serving pointer


def test_rayservice_serves_the_same_app_from_object_storage_on_gpus_with_a_pinned_version():
    local = the_app(load_yaml(SERVE_CONFIG))
    app = the_app(rayservice_serve_config(load_yaml(RAYSERVICE)))
    options = ServeOptions.from_args(app["args"])
    assert options.store.startswith("s3://")
    assert options.stage_gpus == 1 and options.version is None  # pinned by user_config alone
    engine = deployments(app)["LLMEngine"]
    assert set(engine["user_config"]) == {"version"}
    assert isinstance(engine["user_config"]["version"], int) and engine["user_config"]["version"] >= 1
    # the same application and deployment options as the local config, apart from the pin
    assert {k: app[k] for k in ("name", "import_path", "route_prefix")} == \
        {k: local[k] for k in ("name", "import_path", "route_prefix")}
    pinned = {name: {k: v for k, v in d.items() if k != "user_config"} for name, d in deployments(app).items()}
    assert pinned == deployments(local)


def test_serve_checks_reject_broken_copies():
    good = load_yaml(SERVE_CONFIG)

    def broken(change) -> dict:
        config = copy.deepcopy(good)
        change(config["applications"][0])
        return config

    def engine(app) -> dict:
        return deployments(app)["LLMEngine"]

    # Ray Serve's schema itself
    zero = broken(lambda app: engine(app).update(max_ongoing_requests=0))
    assert any("max_ongoing_requests" in p for p in serve_config_problems(zero))
    assert serve_config_problems(broken(lambda app: app.update(import_path="no-colon-or-dot")))
    # keys Serve ignores without a word: the reason for unknown_keys
    typo = broken(lambda app: engine(app).update(num_replica=2))
    ServeDeploySchema.model_validate(typo)  # accepted by Serve ...
    assert serve_config_problems(typo) == ["applications[mmer].deployments[LLMEngine].num_replica: "
                                           "not an option of DeploymentSchema"]  # ... not here
    scaling = broken(lambda app: deployments(app)["MediaEncoders"]["autoscaling_config"].update(max_replica=4))
    ServeDeploySchema.model_validate(scaling)
    assert any("max_replica: not an option of AutoscalingConfig" in p for p in serve_config_problems(scaling))
    bad_value = broken(lambda app: deployments(app)["MediaEncoders"]["autoscaling_config"].update(min_replicas="x"))
    ServeDeploySchema.model_validate(bad_value)  # an untyped dict to Serve's schema
    assert serve_config_problems(bad_value)
    assert serve_config_problems({**good, "http_option": {}}) == ["http_option: not an option of ServeDeploySchema"]

    # what the application's deployments take
    misnamed = broken(lambda app: engine(app).update(name="LLMEngin"))["applications"][0]
    assert serve_config_problems({"applications": [misnamed]}) == []  # fine to Serve's schema ...
    assert [p.split(":")[0] for p in override_problems(misnamed)] == ["LLMEngin"]  # ... not to the app
    negative = broken(lambda app: engine(app).update(graceful_shutdown_timeout_s=-1))["applications"][0]
    assert [p.split(":")[0] for p in override_problems(negative)] == ["LLMEngine"]

    # the application's args
    args = good["applications"][0]["args"]
    for bad in ({**args, "stage": 2}, {**args, "stages": "two"}, {**args, "slot_budget": "lots"},
                {**args, "limits": {**args["limits"], "max_pixels": 1}}, {k: v for k, v in args.items() if k != "store"}):
        with pytest.raises(pydantic.ValidationError):
            ServeOptions.model_validate(bad)


# -- the KubeRay CRDs ----------------------------------------------------------------------------------


def _git_blob(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_vendored_crds_are_kuberay_v1_7_0_verbatim():
    source = (CRDS / "SOURCE.md").read_text()
    listed = dict(re.findall(r"\|\s*(ray\.io_\w+\.yaml)\s*\|\s*([0-9a-f]{40})\s*\|", source))
    assert set(listed) == {RAYSERVICE_CRD.name, RAYJOB_CRD.name}
    for name, blob in listed.items():
        assert _git_blob(CRDS / name) == blob, f"{name} differs from KubeRay v1.7.0's"


@pytest.mark.parametrize("manifest, crd", [(RAYSERVICE, RAYSERVICE_CRD), (RAYJOB, RAYJOB_CRD)],
                         ids=["rayservice", "rayjob-merge"])
def test_manifest_passes_the_kuberay_crd_schema(manifest, crd):
    assert k8s_schema.errors(load_yaml(manifest), crd) == []


def _head(m):
    return m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker(m):
    return m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


BROKEN = {  # what to break -> the field the error must name
    "a string for an integer": (lambda m: _worker(m).update(replicas="1"),
                                "workerGroupSpecs.0.replicas: '1' is not of type 'integer'"),
    "a float quantity": (lambda m: _worker(m)["template"]["spec"]["containers"][0]["resources"]["limits"]
                         .update(cpu=0.5), "containers.0.resources.limits.cpu"),
    "a malformed quantity": (lambda m: _head(m)["resources"]["limits"].update(memory="16 GB"),
                             "containers.0.resources.limits.memory"),
    "an unknown field": (lambda m: m["spec"]["rayClusterConfig"].update(headGroupSpecs={}),
                         "'headGroupSpecs' was unexpected"),
    "a misspelt container field": (lambda m: _head(m).update(imagePullPolicies="Always"),
                                   "'imagePullPolicies' was unexpected"),
    "a duplicate env name (list-map key)": (lambda m: _head(m)["env"].append({"name": "MMER_API_TOKEN", "value": "x"}),
                                            "containers.0.env: items"),
    "a duplicate port (key with a default)": (lambda m: _head(m)["ports"].append({"containerPort": 8000, "name": "x"}),
                                              "protocol='TCP'"),
    "a null for a non-nullable field": (lambda m: _head(m).update(image=None), "containers.0.image: None"),
    "a value a CEL rule refuses": (lambda m: m["spec"].update(managedBy="me"), "spec.managedBy: the managedBy field"),
    "an int32 out of range": (lambda m: _worker(m).update(maxReplicas=2**31), "out of the int32 range"),
    "a missing required field": (lambda m: m["spec"].pop("rayClusterConfig"), "'rayClusterConfig' is a required"),
    "a status": (lambda m: m.update(status={}), "'status' was unexpected"),
    "a bad name": (lambda m: m["metadata"].update(name="Mmer_Serve"), "metadata.name"),
    "a bad label key": (lambda m: m["metadata"]["labels"].update({"a b": "c"}), "metadata.labels"),
    "serveConfigV2 as a mapping": (lambda m: m["spec"].update(serveConfigV2={"applications": []}),
                                   "spec.serveConfigV2"),
}


@pytest.mark.parametrize("what", BROKEN)
def test_crd_check_rejects_a_broken_rayservice(what):
    change, expected = BROKEN[what]
    manifest = copy.deepcopy(load_yaml(RAYSERVICE))
    change(manifest)
    problems = k8s_schema.errors(manifest, RAYSERVICE_CRD)
    assert problems and any(expected in p for p in problems), problems


def test_crd_check_rejects_a_broken_rayjob_and_skips_transition_rules():
    job = load_yaml(RAYJOB)
    # a CEL rule over two fields (KubeRay's deletionStrategy: both legacy policies, or rules)
    half = copy.deepcopy(job)
    half["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    assert any("deletionStrategy requires either BOTH" in p for p in k8s_schema.errors(half, RAYJOB_CRD))
    both = copy.deepcopy(half)
    both["spec"]["deletionStrategy"]["onFailure"] = {"policy": "DeleteNone"}
    assert k8s_schema.errors(both, RAYJOB_CRD) == []
    # managedBy carries `self == oldSelf` (updates only) beside a value rule: a valid value passes
    managed = copy.deepcopy(job)
    managed["spec"]["managedBy"] = "ray.io/kuberay-operator"
    assert k8s_schema.errors(managed, RAYJOB_CRD) == []
    # the manifest is checked against its own kind's CRD
    with pytest.raises(ValueError, match="RayService"):
        k8s_schema.errors(job, RAYSERVICE_CRD)


# -- what KubeRay's operator checks or relies on beyond the schema ----------------------------------------


def _templates(manifest: dict) -> list[dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_rayservice_has_what_kuberay_expects():
    manifest = load_yaml(RAYSERVICE)
    spec, cluster = manifest["spec"], manifest["spec"]["rayClusterConfig"]
    name = manifest["metadata"]["name"]
    assert _DNS_1035.match(name) and len(name) <= MAX_RAYSERVICE_NAME  # ValidateRayServiceMetadata
    assert spec["upgradeStrategy"]["type"] in UPGRADE_TYPES  # ValidateRayServiceSpec
    assert "name" not in cluster["headGroupSpec"].get("headService", {}).get("metadata", {})

    # Listed head ports replace KubeRay's defaults: the serve service needs a port named "serve"
    # (Serve's HTTP port), KubeRay reaches Serve through "dashboard".
    serve_config = rayservice_serve_config(manifest)
    head = _head(manifest)
    ports = {p.get("name"): p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == serve_config["http_options"]["port"]
    assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379
    for template in _templates(manifest):
        container = template["spec"]["containers"][0]
        # a probe written here would replace KubeRay's, which checks the raylet and (workers) the proxy
        assert "readinessProbe" not in container and "livenessProbe" not in container

    # worker groups: sizes set and ordered (autoscaling is off)
    assert cluster.get("enableInTreeAutoscaling") is False
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]  # k8s' rule

    for params in [cluster["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in cluster["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in params.values())


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _nodes(manifest: dict) -> list[dict[str, float]]:
    """The Ray resources of the cluster's pods: what the head's rayStartParams or its container
    limits give, each worker group's times its replicas."""
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    cpus = head["rayStartParams"].get("num-cpus", _head(manifest)["resources"]["limits"]["cpu"])
    nodes = [{"CPU": _cpus(cpus), "GPU": 0.0}]
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus = group["rayStartParams"].get("num-cpus", limits["cpu"])
        nodes += [{"CPU": _cpus(cpus), "GPU": float(limits.get("nvidia.com/gpu", 0))}
                  for _ in range(group["replicas"])]
    return nodes


def _bundles(app: dict) -> list[dict[str, float]]:
    """Every resource bundle the application asks for at its largest: each replica's placement
    group bundles (or its actor options), autoscaled deployments at max_replicas."""
    demand = []
    for name, deployment in built_deployments(app).items():
        override = deployments(app).get(name, {})
        config, replica = deployment._deployment_config, deployment._replica_config
        scaling = override.get("autoscaling_config") or config.autoscaling_config
        replicas = override.get("num_replicas") or (
            (scaling["max_replicas"] if isinstance(scaling, dict) else scaling.max_replicas) if scaling else config.num_replicas)
        actor = replica.ray_actor_options
        per_replica = replica.placement_group_bundles or [
            {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0)}]
        demand += [dict(b) for b in per_replica] * replicas
    return demand


def unplaced(manifest: dict) -> list[dict[str, float]]:
    """The bundles that find no pod: first fit, largest first (the engine's placement group is
    PACK, so its bundles may land on different pods)."""
    nodes = _nodes(manifest)
    demand = sorted(_bundles(the_app(rayservice_serve_config(manifest))),
                    key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True)
    left = []
    for bundle in demand:
        node = next((n for n in nodes if all(n.get(k, 0) >= v for k, v in bundle.items())), None)
        if node is None:
            left.append(bundle)
            continue
        for k, v in bundle.items():
            node[k] -= v
    return left


def test_rayservice_cluster_holds_the_app_at_its_largest():
    manifest = load_yaml(RAYSERVICE)
    assert any(b.get("GPU") for b in _bundles(the_app(rayservice_serve_config(manifest)))), "no GPU stage"
    assert unplaced(manifest) == []
    # the engine at max_replicas: one GPU worker fewer leaves a replica's stage unplaced
    fewer = copy.deepcopy(manifest)
    fewer["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] -= 1
    assert unplaced(fewer) == [{"CPU": 1.0, "GPU": 1.0}]
    # two stages of one GPU each per replica do not fit one GPU worker per replica
    config = rayservice_serve_config(manifest)
    config["applications"][0]["args"]["stages"] = 2
    manifest["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert unplaced(manifest) == [{"CPU": 1.0, "GPU": 1.0}] * 2


def test_rayservice_runs_the_rayjobs_image_and_ray_version():
    manifest, job = load_yaml(RAYSERVICE), load_yaml(RAYJOB)
    version = manifest["spec"]["rayClusterConfig"]["rayVersion"]
    assert version == job["spec"]["rayClusterSpec"]["rayVersion"]
    assert f"rayproject/ray:{version}-" in DOCKERFILE.read_text()
    images = {t["spec"]["containers"][0]["image"] for t in _templates(manifest)}
    job_cluster = job["spec"]["rayClusterSpec"]
    job_images = {t["spec"]["containers"][0]["image"]
                  for t in [job_cluster["headGroupSpec"]["template"]] + [g["template"] for g in job_cluster["workerGroupSpecs"]]}
    assert len(images) == 1 and images == job_images


def test_rayservice_secrets_reach_head_and_workers():
    manifest, job = load_yaml(RAYSERVICE), load_yaml(RAYJOB)
    job_head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    store_secret = _env(job_head)["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"]  # the merge's
    token_env = ServeOptions.from_args(the_app(rayservice_serve_config(manifest))["args"]).api_token_env
    assert token_env == "MMER_API_TOKEN"
    for template in _templates(manifest):
        env = _env(template["spec"]["containers"][0])
        token = env[token_env]["valueFrom"]["secretKeyRef"]
        assert token["name"] and token["key"] and not token.get("optional", False)  # no Secret: no pod
        store = {k: env[k]["valueFrom"]["secretKeyRef"] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        assert {ref["name"] for ref in store.values()} == {store_secret}
        assert all(ref["key"] == k for k, ref in store.items())
