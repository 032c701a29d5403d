"""Static checks of the GPU deployment files (no Docker engine or cluster here): they parse, pin
their images, expose Triton's three ports, reserve a GPU, probe readiness, and agree with each other
and with the Triton version our client pins."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
TRITON_PORTS = {8000, 8001, 8002}
IMAGE = "dspark-triton:0.1.0"
# NGC container release -> the Triton server version inside it (release notes).
TRITON_RELEASE_TO_SERVER = {"24.10": "2.51.0"}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, args = pending.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            pending = ""
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


def test_dockerfile_is_pinned_to_the_server_our_client_matches() -> None:
    instructions = dockerfile_instructions(DOCKER / "Dockerfile")
    known = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "HEALTHCHECK", "CMD", "ENTRYPOINT", "LABEL"}
    assert {k for k, _ in instructions} <= known
    froms = [args for k, args in instructions if k == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", froms[0])
    assert match, f"base must be a pinned official tritonserver -py3 image, got {froms[0]}"
    client_pin = re.search(r'"tritonclient\[[^\]]*\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert TRITON_RELEASE_TO_SERVER[match.group(1)] == client_pin

    text = (DOCKER / "Dockerfile").read_text()
    assert ":latest" not in text
    assert not any(k == "ADD" for k, _ in instructions), "use COPY; ADD fetches URLs and unpacks archives"
    assert re.search(r"tensorrt-cu12==\$\{TENSORRT_VERSION\}", text)
    assert re.search(r"ARG TENSORRT_VERSION=\d+\.\d+\.\d+", text)
    assert "PIP_NO_CACHE_DIR=1" in text
    exposed = {int(p) for k, args in instructions if k == "EXPOSE" for p in args.split()}
    assert exposed == TRITON_PORTS
    users = [args for k, args in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the server should not run as root"
    assert any(k == "HEALTHCHECK" and "/v2/health/ready" in args for k, args in instructions)
    cmd = [args for k, args in instructions if k == "CMD"][-1]
    assert cmd.startswith("[") and "--model-repository=/models" in cmd, "CMD in exec form, serving /models"
    # `docker stop` signals PID 1: the entrypoint (tests/test_server_stop.py runs it), executable, in exec form
    workdir = [args for k, args in instructions if k == "WORKDIR"][-1]
    assert [args for k, args in instructions if k == "ENTRYPOINT"][-1] == f'["{workdir}/entrypoint.sh"]'
    assert any(k == "COPY" and "docker/entrypoint.sh" in args.split()[:-1] for k, args in instructions)
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)
    for k, args in instructions:  # every COPY source exists in the build context (the repository root)
        if k == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"


def test_dockerignore_keeps_local_artifacts_out() -> None:
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for pattern in (".venv", ".git", "**/*.onnx.data", "**/*.safetensors"):
        assert pattern in ignored
    # docker/ stays out but the entrypoint the Dockerfile copies from it (a later ! line re-includes)
    assert ignored.index("!docker/entrypoint.sh") > ignored.index("docker")


def test_compose_serves_three_ports_with_gpu_and_shm() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    service = compose["services"]["triton"]
    assert service["image"] == IMAGE
    assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    published = {int(p.split(":")[0]) for p in service["ports"]}
    targets = {int(p.split(":")[1]) for p in service["ports"]}
    assert published == targets == TRITON_PORTS
    assert re.fullmatch(r"\d+[gm]b", service["shm_size"])
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert any("/v2/health/ready" in part for part in service["healthcheck"]["test"])
    for volume in service["volumes"]:
        assert volume.split(":")[0] in compose["volumes"]


def _k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted((DOCKER / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind"} <= doc.keys(), path
            docs[doc["kind"]] = doc
    return docs


def test_k8s_deployment_replicas_probes_gpu_and_scraping() -> None:
    docs = _k8s()
    assert {"Deployment", "Service", "ServiceMonitor", "Kustomization"} <= docs.keys()
    kustomize = docs["Kustomization"]["resources"]
    assert all((DOCKER / "k8s" / r).is_file() for r in kustomize)

    deploy = docs["Deployment"]
    assert deploy["apiVersion"] == "apps/v1"
    spec = deploy["spec"]
    assert spec["replicas"] >= 2
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8002"
    (container,) = spec["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert set(ports.values()) == TRITON_PORTS
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["readinessProbe"]["httpGet"]["port"] in ports
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    # no `command`: the image's entrypoint takes the kubelet's SIGTERM and drains the engine before Triton stops
    assert "command" not in container and container["args"][0] == "tritonserver"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"

    service = docs["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    svc_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {p["port"] for p in svc_ports.values()} == TRITON_PORTS
    assert all(p["targetPort"] in ports for p in svc_ports.values())

    monitor = docs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert all(e["port"] in svc_ports for e in monitor["spec"]["endpoints"])


def test_gpu_check_script_is_ready_to_run() -> None:
    script = ROOT / "scripts" / "gpu_check.sh"
    assert script.stat().st_mode & 0o111, "gpu_check.sh must be executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -euo pipefail" in text
    limits = [int(n) for n in re.findall(r"^step \w+ (\d+) ", text, re.MULTILINE)]
    assert len(limits) >= 4 and sum(limits) + 10 * len(limits) < 8 * 60, "steps must fit in 8 minutes"
