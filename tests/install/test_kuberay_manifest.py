"""deploy/kuberay: the RayCluster manifest and its image agree with the project (no cluster here:
these check what would otherwise only fail on one, e.g. a Ray version the extra does not pin)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kuberay"


def _docs() -> tuple[dict, dict]:
    cluster, service = yaml.safe_load_all((DEPLOY / "raycluster.yaml").read_text())
    return cluster, service


def _ray_pin() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (spec,) = extras["ray"]
    return spec


def _containers(cluster: dict) -> list[dict]:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_ray_versions_agree_with_the_extra():
    cluster, _ = _docs()
    low = re.search(r">=([\d.]+)", _ray_pin())[1]
    assert cluster["spec"]["rayVersion"] == low
    assert f'"ray[default]{_ray_pin()[3:]}"' in (DEPLOY / "Dockerfile").read_text()


def test_gpu_pods_offer_ray_every_gpu_they_hold_and_the_head_none():
    cluster, _ = _docs()
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in cluster["spec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert group["rayStartParams"]["num-gpus"] == container["resources"]["limits"]["nvidia.com/gpu"]


def test_the_front_end_joins_as_driver_and_every_container_shares_the_token():
    cluster, service = _docs()
    front = next(c for c in _containers(cluster) if c["name"] == "k5serve")
    assert "k5serve serve --ray-address auto" in " ".join(front["args"])
    for container in _containers(cluster):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "k5serve-ray-token"
    assert service["spec"]["selector"] == {"ray.io/cluster": "k5serve", "ray.io/node-type": "head"}
    assert service["spec"]["ports"][0]["targetPort"] == front["ports"][0]["containerPort"]


def test_the_front_end_and_every_gpu_pod_see_the_weights_at_the_same_path():
    """Actors get --weights-dir as a path (ray_cluster.ray_workers); admission reads it on the front end."""
    cluster, _ = _docs()
    front = next(c for c in _containers(cluster) if c["name"] == "k5serve")
    path = next(e["value"] for e in front["env"] if e["name"] == "K5SERVE_WEIGHTS_DIR")
    gpu_pods = [g["template"]["spec"]["containers"][0] for g in cluster["spec"]["workerGroupSpecs"]]
    for container in [front, *gpu_pods]:
        assert path in [m["mountPath"] for m in container["volumeMounts"]], container["name"]
