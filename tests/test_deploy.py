"""The deployment examples (unit tier): the Dockerfile lints clean, the Kubernetes manifests validate
against the Kubernetes schema, and the gateway config inside them is a valid emugate config. Nothing
here builds an image or talks to a cluster (none is available on the build hosts)."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT
from gateway.config import parse_config

DEPLOY = ROOT / "deploy"


def test_dockerfile_lints_clean_and_copies_what_exists():
    exe = shutil.which("hadolint")
    assert exe, "hadolint is a test dependency (pip install -e '.[test]')"
    p = subprocess.run([exe, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    for src in re.findall(r"^COPY (\S+)", (DEPLOY / "Dockerfile").read_text(), re.M):
        assert (ROOT / src).exists(), src


@pytest.mark.parametrize("k8s", ["1.29.0", "1.31.0"])
def test_kubernetes_manifests_validate_against_the_schema(k8s):
    exe = shutil.which("kubernetes-validate")
    assert exe, "kubernetes-validate is a test dependency"
    p = subprocess.run([exe, "--strict", "-k", k8s, str(DEPLOY / "kubernetes" / "emugate.yaml")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("passed") + p.stderr.count("passed") >= 6


def test_the_gateway_config_in_the_configmap_is_valid_and_fronts_the_statefulset():
    import tomllib
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "emugate.yaml").read_text()))
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = parse_config(tomllib.loads(cm["data"]["fleet.toml"]), "configmap fleet.toml")
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    b = cfg.backends[0]
    name, n = sts["metadata"]["name"], sts["spec"]["replicas"]
    assert b.urls == [f"http://{name}-{i}.{sts['spec']['serviceName']}:8000" for i in range(n)]
    probes = sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
    assert probes == "/ready"
