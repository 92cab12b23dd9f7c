"""Deployment files checked by real tools: the compose-spec schema, hadolint, Ray's own
cluster-config validation and runtime-env parsing. Each check is also shown to fail on
a broken copy, so a pass means something."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _check_compose(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
    )


def test_compose_file_follows_the_compose_spec(tmp_path):
    ok = _check_compose(ROOT / "deploy" / "compose.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    broken["services"]["ray-worker"]["deploy"]["replicas"] = [1]
    broken["services"]["capture"]["helthcheck"] = {}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    failed = _check_compose(path)
    assert failed.returncode != 0 and "helthcheck" in failed.stdout + failed.stderr


def test_compose_services_share_the_store_volume_and_health_checks():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    gpu = services["capture"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and services["capture"]["profiles"] == ["gpu"]
    assert services["capture-cpu"]["profiles"] == ["cpu"]
    for name in ("capture", "capture-cpu", "ray-head", "ray-worker"):
        assert "stores:/data" in services[name]["volumes"], name
        assert "healthcheck" in services[name], name


def test_dockerfiles_pass_hadolint_and_run_as_non_root(tmp_path):
    files = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.gpu"]
    lint = subprocess.run([BIN / "hadolint", *map(str, files)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for path in files:
        text = path.read_text()
        assert "USER 1000:1000" in text and "HEALTHCHECK" in text
        assert 'ENTRYPOINT ["moetrace-entrypoint"]' in text
        assert "docker/entrypoint.sh /usr/local/bin/moetrace-entrypoint" in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(files[0].read_text().replace("USER 1000:1000", "USER root"))
    lint = subprocess.run([BIN / "hadolint", str(broken)], capture_output=True, text=True)
    assert lint.returncode != 0 and "DL3002" in lint.stdout  # last user should not be root


def test_shell_scripts_pass_shellcheck(tmp_path):
    scripts = [ROOT / "docker" / "entrypoint.sh", *sorted((ROOT / "scripts").glob("*.sh"))]
    check = subprocess.run([BIN / "shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    broken = tmp_path / "entrypoint.sh"
    broken.write_text(scripts[0].read_text().replace('serve "$@"', "serve $@"))
    check = subprocess.run([BIN / "shellcheck", str(broken)], capture_output=True, text=True)
    assert check.returncode != 0 and "SC2068" in check.stdout  # unquoted $@


def test_ray_cluster_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "deploy" / "ray" / "cluster.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before validating
    validate_config(prepared)
    assert prepared["docker"]["image"] == "moetrace:cpu"
    broken = copy.deepcopy(config)
    broken["docker"]["imagee"] = broken["docker"].pop("image")
    with pytest.raises(Exception, match="image"):
        validate_config(prepare_config(broken))


def test_ray_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((ROOT / "deploy" / "ray" / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**spec)
    assert any(p.startswith("zarr") for p in env["pip"]["packages"])
    assert not any(p.startswith(("vllm", "torch")) for p in env["pip"]["packages"])
    with pytest.raises((TypeError, ValueError)):
        RuntimeEnv(**{**spec, "pip": 3})
