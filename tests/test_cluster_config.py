"""Cluster deployment files agree with Ray Serve, with the settings and with each other.

Fast and offline: nothing is started (no Ray cluster, Kubernetes or Milvus). configs/*.yaml are
validated on their own (Serve schema, AppSettings, build_app) in test_settings.py; here the checks
are about cluster mode: the RayService embeds configs/cluster.yaml, the Serve placement survives a
node loss, the Milvus shards and in-memory replicas fit the Milvus cluster, and credentials and
Ray token auth come from Secrets.

Rules checked for Milvus (cluster/README.md explains them):
- replica_number <= query nodes, and query nodes a multiple of replica_number: Milvus gives each
  in-memory replica its own query nodes, so an uneven split leaves one replica on fewer nodes.
- 1 <= num_shards <= min(proxy.maxShardNum (16), data nodes): each shard's insert channel is
  consumed by one data node; more shards than data nodes adds no write parallelism.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from deployments.core.settings import AppSettings
from serve_app.app import deployment_options

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CLUSTER_CONFIG = ROOT / "configs" / "cluster.yaml"
LOCAL_CONFIG = ROOT / "configs" / "config.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
LAUNCHER = CLUSTER / "ray-cluster-launcher.yaml"
HELM_VALUES = CLUSTER / "milvus" / "values.yaml"
OPERATOR = CLUSTER / "milvus" / "milvus-operator.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
README = CLUSTER / "README.md"
YAML_FILES = sorted({*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml"),
                     *(ROOT / "configs").glob("*.yaml")})
SPREAD = ("image_encoder", "text_encoder", "search", "ingress")   # replicas spread over nodes
ENCODERS = ("image_encoder", "text_encoder")
MILVUS_MAX_SHARDS = 16   # Milvus proxy.maxShardNum default


# -- loading -------------------------------------------------------------------------------
def documents(path: Path) -> list[dict]:
    """Every non-empty YAML document of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str) -> dict:
    """The single document of this kind in a multi-document manifest."""
    found = [d for d in documents(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


@functools.cache
def rayservice() -> dict:
    return one(RAYSERVICE, "RayService")


def embedded_serve_config() -> dict:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_CONFIG.read_text())


def cluster_args() -> dict:
    (app,) = cluster_config()["applications"]
    return app["args"]


def helm_values() -> dict:
    return yaml.safe_load(HELM_VALUES.read_text())


def helm_milvus_config() -> dict:
    """The milvus.yaml overrides the Helm values carry (extraConfigFiles)."""
    extra = helm_values().get("extraConfigFiles") or {}
    merged: dict = {}
    for text in extra.values():
        merged.update(yaml.safe_load(text) or {})
    return merged


def operator_milvus() -> dict:
    return one(OPERATOR, "Milvus")


def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def ray_groups() -> dict[str, dict]:
    """Pod template spec per Ray group: 'head' and each worker groupName."""
    cluster = rayservice()["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    return groups


def ray_containers() -> dict[str, dict]:
    """The Ray container (the first) of each group's pod template."""
    return {name: g["template"]["spec"]["containers"][0] for name, g in ray_groups().items()}


def cpu_quantity(value: str | int | float) -> float:
    """Kubernetes CPU quantity ('500m', '8', 2) in CPUs."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


@pytest.fixture
def settings(monkeypatch) -> AppSettings:
    """Cluster settings as a Ray pod builds them: args from the file, the token from the Secret."""
    monkeypatch.delenv("SHOPSEARCH_MILVUS__URI", raising=False)
    monkeypatch.setenv("SHOPSEARCH_MILVUS__TOKEN", "root:from-the-secret")
    return AppSettings(**cluster_args())


# -- every file parses ---------------------------------------------------------------------
def test_cluster_files_exist():
    for path in (RAYSERVICE, LAUNCHER, HELM_VALUES, OPERATOR, DOCKERFILE, README, CLUSTER_CONFIG):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path):
    docs = documents(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)
    for doc in docs:   # embedded YAML strings parse too
        if doc.get("kind") == "RayService":
            assert isinstance(yaml.safe_load(doc["spec"]["serveConfigV2"]), dict)
        for text in (doc.get("extraConfigFiles") or {}).values():
            assert isinstance(yaml.safe_load(text), dict)


# -- the embedded Serve config -------------------------------------------------------------
def test_rayservice_serve_config_validates_and_imports(settings):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(embedded_serve_config())
    assert schema.applications
    for app in schema.applications:
        module_name, _, attr = app.import_path.partition(":")
        target = getattr(importlib.import_module(module_name), attr)
        assert callable(target), app.import_path
        AppSettings(**app.args)


def test_rayservice_embeds_configs_cluster_yaml():
    embedded = embedded_serve_config()
    assert embedded["applications"][0]["args"] == cluster_args(), (
        "serveConfigV2 args in cluster/kuberay/rayservice.yaml differ from configs/cluster.yaml")
    assert embedded == cluster_config(), (
        "serveConfigV2 in cluster/kuberay/rayservice.yaml differs from configs/cluster.yaml "
        "outside args (proxy_location, http_options, logging_config, application fields)")


# -- Milvus as seen by the service ---------------------------------------------------------
def test_cluster_uses_a_milvus_server_with_credentials_from_the_environment(settings):
    assert not settings.milvus.is_lite
    uri = urlparse(settings.milvus.uri)
    assert uri.scheme in ("http", "https") and uri.port == 19530
    assert "token" not in cluster_args()["milvus"], "credentials belong in a Secret, not the config"
    assert settings.milvus.token == "root:from-the-secret"


def test_milvus_uri_names_the_service_the_milvus_manifests_create():
    host = urlparse(cluster_args()["milvus"]["uri"]).hostname
    service, namespace, *rest = host.split(".")
    assert rest == ["svc", "cluster", "local"], host
    readme = README.read_text()
    # The Helm release of that name in that namespace gets a Service of that name.
    assert f"helm install {service} " in readme and f"--namespace {namespace}" in readme
    # The operator's Service is <name>-milvus; an ExternalName Service gives it the same name.
    milvus = operator_milvus()
    alias = one(OPERATOR, "Service")
    assert (alias["metadata"]["name"], alias["metadata"]["namespace"]) == (service, namespace)
    assert alias["spec"]["type"] == "ExternalName"
    target = f"{milvus['metadata']['name']}-milvus.{milvus['metadata']['namespace']}"
    assert alias["spec"]["externalName"] == f"{target}.svc.cluster.local"


def test_index_and_consistency_match_the_single_machine_config(settings):
    """The same graph, metric and search effort as the embedded store; the server keeps full
    vectors in its HNSW (HNSW_SQ is documented from Milvus 2.6; the Helm values pin 2.5.9)."""
    (local_app,) = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"]
    local = AppSettings(**local_app["args"]).milvus
    for field in ("metric", "search_params", "collection"):
        assert getattr(settings.milvus, field) == getattr(local, field), field
    assert (local.index_type, settings.milvus.index_type) == ("HNSW_SQ", "HNSW")
    graph = {k: v for k, v in local.index_params.items() if k != "sq_type"}
    assert settings.milvus.index_params == graph
    assert "2.5.9" in HELM_VALUES.read_text() and settings.milvus.consistency_level == "Bounded"


def milvus_node_counts() -> dict[str, dict[str, int]]:
    """Replicas of each Milvus node kind, per deployment method."""
    helm = helm_values()
    components = operator_milvus()["spec"]["components"]
    kinds = ("queryNode", "dataNode", "indexNode", "proxy")
    return {
        "helm": {k: int(helm[k]["replicas"]) for k in kinds},
        "operator": {k: int(components[k]["replicas"]) for k in kinds},
    }


@pytest.mark.parametrize("method", ["helm", "operator"])
def test_in_memory_replicas_fit_the_query_nodes(settings, method):
    query_nodes = milvus_node_counts()[method]["queryNode"]
    replicas = settings.milvus.replica_number
    assert replicas >= 2, "one in-memory replica cannot survive a query node loss"
    assert replicas <= query_nodes
    assert query_nodes % replicas == 0, "give every in-memory replica the same number of nodes"


@pytest.mark.parametrize("method", ["helm", "operator"])
def test_shards_fit_the_data_nodes(settings, method):
    data_nodes = milvus_node_counts()[method]["dataNode"]
    config = helm_milvus_config() if method == "helm" else operator_milvus()["spec"]["config"]
    max_shards = (config.get("proxy") or {}).get("maxShardNum", MILVUS_MAX_SHARDS)
    assert 1 <= settings.milvus.num_shards <= min(max_shards, data_nodes)


def test_helm_and_operator_describe_the_same_milvus():
    counts = milvus_node_counts()
    assert counts["helm"] == counts["operator"]
    helm_tag = helm_values()["image"]["all"]["tag"]
    assert operator_milvus()["spec"]["components"]["image"].endswith(f":{helm_tag}")


def test_helm_values_describe_a_distributed_milvus_with_its_dependencies():
    v = helm_values()
    assert v["cluster"]["enabled"] is True
    assert version_tuple(v["image"]["all"]["tag"]) >= (2, 4), "multi-vector schema needs 2.4+"
    counts = milvus_node_counts()["helm"]
    assert counts["proxy"] >= 2 and counts["dataNode"] >= 2 and counts["queryNode"] >= 2
    assert v["indexNode"]["enabled"] and counts["indexNode"] >= 1
    assert v["mixCoordinator"]["replicas"] >= 2 and v["mixCoordinator"]["activeStandby"]["enabled"]
    queues = [name for name in ("pulsarv3", "pulsar", "kafka", "externalPulsar", "externalKafka",
                                "woodpecker") if (v.get(name) or {}).get("enabled")]
    assert len(queues) == 1 and queues[0] != "woodpecker", f"one Pulsar or Kafka queue: {queues}"
    assert v["minio"]["enabled"] or (v.get("externalS3") or {}).get("enabled"), "object store"
    assert v["etcd"]["enabled"] or (v.get("externalEtcd") or {}).get("enabled"), "etcd"
    assert v["etcd"]["replicaCount"] >= 3
    assert v["minio"]["secretKey"] != "minioadmin", "never the chart's default MinIO secret"
    assert helm_milvus_config()["common"]["security"]["authorizationEnabled"] is True


def test_operator_resource_describes_the_same_kind_of_milvus():
    milvus = operator_milvus()
    assert milvus["apiVersion"] == "milvus.io/v1beta1"
    spec = milvus["spec"]
    assert spec["mode"] == "cluster"
    assert version_tuple(spec["components"]["image"].rsplit(":", 1)[1]) >= (2, 4)
    deps = spec["dependencies"]
    assert deps["msgStreamType"] in ("pulsar", "kafka")
    assert deps[deps["msgStreamType"]].get("inCluster") or deps[deps["msgStreamType"]].get(
        "external")
    assert deps["storage"]["type"] in ("MinIO", "S3")
    assert deps["storage"].get("inCluster") or deps["storage"].get("external")
    assert deps["etcd"].get("inCluster") or deps["etcd"].get("endpoints")
    assert spec["components"]["mixCoord"]["replicas"] >= 2
    assert spec["config"]["common"]["security"]["authorizationEnabled"] is True


# -- Serve placement -----------------------------------------------------------------------
def test_replicas_are_spread_across_nodes(settings):
    for name in SPREAD:
        scaling = getattr(settings, name)
        assert scaling.max_replicas_per_node, f"{name}: set max_replicas_per_node"
        assert deployment_options(scaling)["max_replicas_per_node"] == scaling.max_replicas_per_node
        # The minimum replicas span at least two nodes: one node loss leaves some serving.
        nodes = math.ceil(scaling.min_replicas / scaling.max_replicas_per_node)
        assert nodes >= 2, f"{name}: its min_replicas could all sit on one node"
    assert settings.search.max_replicas > 1, "a Milvus server allows several search replicas"


def test_encoder_threads_match_their_cpu_reservation(settings):
    for name in ENCODERS:
        scaling = getattr(settings, name)
        assert 1 <= scaling.num_cpus <= 2, name
        assert scaling.threads() == scaling.num_cpus, name


def test_serve_replicas_fit_the_cpu_worker_group(settings):
    group = ray_groups()["cpu"]
    container = ray_containers()["cpu"]
    pod_cpus = cpu_quantity(container["resources"]["limits"]["cpu"])
    parts = [getattr(settings, name) for name in SPREAD]
    # Whatever Ray packs onto one node fits one worker pod.
    assert sum(p.max_replicas_per_node * p.num_cpus for p in parts) <= pod_cpus
    # Minimum scale fits the minimum worker count, full scale the maximum.
    assert sum(p.min_replicas * p.num_cpus for p in parts) <= group["minReplicas"] * pod_cpus
    assert sum(p.max_replicas * p.num_cpus for p in parts) <= group["maxReplicas"] * pod_cpus
    for p in parts:   # and max_replicas_per_node does not make a replica unplaceable
        assert p.min_replicas <= p.max_replicas_per_node * group["minReplicas"]
        assert p.max_replicas <= p.max_replicas_per_node * group["maxReplicas"]


def test_proxies_on_every_node_behind_the_worker_readiness_probe():
    config = cluster_config()
    assert config["proxy_location"] == "EveryNode"
    assert config["http_options"]["host"] == "0.0.0.0"
    port = config["http_options"]["port"]
    assert rayservice()["spec"]["excludeHeadPodFromServeSvc"] is True
    for name, container in ray_containers().items():
        if name == "head":
            continue
        assert port in {p["containerPort"] for p in container["ports"]}, name
        probe = container["readinessProbe"]["httpGet"]
        assert (probe["path"], probe["port"]) == ("/-/healthz", port), name


def test_every_ray_pod_runs_the_fast_http_path():
    """Its variables are read when Ray starts on a pod, so every Ray pod (head, where jobs run,
    and workers, where HAProxy answers the Service's port) sets the same ones, the request-log
    buffer of 1 included (README "Faster HTTP path")."""
    from tests.test_fast_http import FAST

    for name, container in ray_containers().items():
        env = env_of(container)
        assert {k: env.get(k, {}).get("value") for k in FAST} == FAST, name


# -- the Ray cluster -----------------------------------------------------------------------
def test_rayservice_cluster_shape():
    import ray

    doc = rayservice()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = ray_groups()
    assert groups["cpu"]["minReplicas"] >= 2
    gpu = groups["gpu"]
    assert gpu["replicas"] == 0 and gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    assert int(ray_containers()["gpu"]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    images = {c["image"] for c in ray_containers().values()}
    assert len(images) == 1, f"one image for every Ray pod: {images}"
    for name, container in ray_containers().items():
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
        assert container["readinessProbe"] and container["livenessProbe"], name
        # Liveness must not hang on Milvus: the app's /healthz would restart pods in an outage.
        assert container["livenessProbe"]["httpGet"]["path"] != "/healthz", name


def test_ray_token_auth_stays_on():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    auth = cluster.get("authOptions") or {}
    for name, container in ray_containers().items():
        env = env_of(container)
        assert env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token", name
        if auth.get("mode") != "token":   # without KubeRay's authOptions, set it by hand
            assert env["RAY_AUTH_MODE"]["value"] == "token", name
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"], name
        assert "value" not in env.get("RAY_AUTH_TOKEN", {}), "the token comes from a Secret"
    if auth:
        assert auth["mode"] == "token" and auth.get("secretName")
    assert "RAY_AUTH_MODE=disabled" not in LAUNCHER.read_text()


def test_milvus_credentials_come_from_a_secret():
    for name, container in ray_containers().items():
        token = env_of(container).get("SHOPSEARCH_MILVUS__TOKEN")
        assert token and "value" not in token, f"{name}: SHOPSEARCH_MILVUS__TOKEN from a Secret"
        assert token["valueFrom"]["secretKeyRef"]["name"], name


def test_write_api_keys_come_from_a_secret(monkeypatch):
    """Every Ray pod (wherever Serve builds the app) gets SHOPSEARCH_API_KEYS from one Secret,
    the config carries no key, and the README says how to rotate keys and where rate limits go."""
    refs = set()
    for name, container in ray_containers().items():
        keys = env_of(container).get("SHOPSEARCH_API_KEYS")
        assert keys and "value" not in keys, f"{name}: SHOPSEARCH_API_KEYS from a Secret"
        ref = keys["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"] and not ref.get("optional"), name
        refs.add((ref["name"], ref["key"]))
    assert len(refs) == 1, refs
    assert "api_keys" not in (cluster_args().get("auth") or {}), "keys belong in a Secret"
    monkeypatch.setenv("SHOPSEARCH_API_KEYS", "new-key,old-key")   # two at once: rotation
    settings = AppSettings(**cluster_args())
    assert [k.get_secret_value() for k in settings.auth.api_keys] == ["new-key", "old-key"]
    assert "new-key" not in repr(settings)
    readme = README.read_text()
    (secret, key), = refs
    assert f"secret generic {secret}" in readme and f"--from-literal={key}=" in readme
    assert "Rotating the API keys" in readme and "$NEW,$OLD" in readme
    assert "Rate limits" in readme and "limit-rps" in readme


def test_media_dir_is_a_shared_volume_on_every_ray_pod(settings):
    media_dir = settings.media_dir
    assert media_dir.startswith("/"), "an absolute path, the same on every node"
    assert not settings.demo.enabled
    claims = {d["metadata"]["name"]: d for d in documents(RAYSERVICE)
              if d.get("kind") == "PersistentVolumeClaim"}
    for name, group in ray_groups().items():
        spec = group["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert media_dir in mounts, f"{name}: mount the shared volume at {media_dir}"
        volume = next(v for v in spec["volumes"] if v["name"] == mounts[media_dir])
        claim = claims[volume["persistentVolumeClaim"]["claimName"]]
        assert "ReadWriteMany" in claim["spec"]["accessModes"], name


def test_image_bakes_the_project_and_the_model_cache(settings):
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert "pip install" in dockerfile
    assert settings.image_model.cache_dir in dockerfile
    assert settings.text_model.cache_dir == settings.image_model.cache_dir  # both exported there
    assert "TextEncoder(TextModelSettings(device='cpu', backend='onnx'" in dockerfile


# -- VMs -----------------------------------------------------------------------------------
def test_launcher_has_head_and_worker_types_and_installs_the_project():
    cfg = launcher()
    assert cfg["provider"]["type"]
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types and types[head]["resources"].get("CPU") == 0
    workers = {n: t for n, t in types.items() if n != head}
    assert workers and all(t["max_workers"] >= 1 for t in workers.values())
    assert any(t.get("min_workers", 0) >= 2 for t in workers.values()), "two nodes at least"
    setup = "\n".join(cfg["setup_commands"])
    assert re.search(r"pip install .*shopsearch", setup), "setup_commands install the project"
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "--address=$RAY_HEAD_IP" in worker_start
    for commands in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in commands and "shopsearch.env" in commands
    assert any("auth_token" in target for target in cfg["file_mounts"])


def test_readme_gives_the_deploy_commands():
    readme = README.read_text()
    for needle in ("helm repo add", "helm install",
                   "kubectl apply -f cluster/kuberay/rayservice.yaml", "port-forward", "curl",
                   "ray job submit", "python -m batch_index index", "ray up"):
        assert needle in readme, needle
    for secret in ("shopsearch-ray-token", "shopsearch-milvus", "milvus-root"):
        assert re.search(rf"kubectl (-n \S+ )?create secret generic {secret}\b", readme), secret
