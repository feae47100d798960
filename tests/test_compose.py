"""compose.yaml, checked without a Docker engine.

- against the Compose specification JSON schema, vendored as tests/data/compose_spec.json from
  the docker-compose 1.29.2 wheel (compose/config/compose_spec.json, Apache-2.0);
- for what the schema cannot see: services that depend on services that exist, host paths
  that exist, commands given as lists;
- every edvit command parses with the real `edvit` argument parser;
- `${VAR:-default}` is read as docker compose reads it with VAR unset;
- broker/mosquitto.conf is accepted by a real mosquitto.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, model_validator

from edvit.broker.local import find_free_port, mosquitto_path, wait_for_port
from edvit.process import stop_process

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
SCHEMA = Path(__file__).parent / "data" / "compose_spec.json"
FLEET_BROKER = "mqtt://broker:1883"
EXPECTED_SERVICES = {
    "broker",
    "deploy",
    "node",
    "aggregator",
    "camera",
    "watch",
}


class Service(BaseModel):
    """The parts of a compose service this project relies on; the rest is allowed through."""

    model_config = ConfigDict(extra="allow", frozen=True)

    image: str | None = None
    build: str | dict[str, Any] | None = None
    command: list[str] | None = None
    depends_on: dict[str, dict[str, str]] | list[str] = {}
    volumes: list[str] = []

    @model_validator(mode="after")
    def _image_or_build(self) -> Service:
        if self.image is None and self.build is None:
            raise ValueError("a service needs an image or a build")
        return self


class ComposeFile(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    services: dict[str, Service]
    volumes: dict[str, Any] = {}


VARIABLE = re.compile(r"\$\{(\w+):-([^}]*)\}")


def interpolate(value: Any) -> Any:
    """Every `${VAR:-default}` in the strings of a parsed compose file, replaced by its
    default (compose interpolates after parsing the YAML, so "3" stays a string)."""
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: m.group(2), value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with COMPOSE.open(encoding="utf-8") as f:
        parsed = interpolate(yaml.safe_load(f))
    # Then it casts the fields that take numbers, as docker-compose 1.29 does for `scale`.
    for service in parsed["services"].values():
        if "scale" in service:
            service["scale"] = int(service["scale"])
    return parsed


@pytest.fixture(scope="module")
def model(compose: dict[str, Any]) -> ComposeFile:
    return ComposeFile.model_validate(compose)


def edvit_commands(model: ComposeFile) -> list[tuple[str, list[str]]]:
    return [
        (name, service.command)
        for name, service in model.services.items()
        if service.command and service.command[0] == "edvit"
    ]


def test_matches_compose_spec_schema(compose: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft201909Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert errors == []


def test_services_are_the_fleet(model: ComposeFile) -> None:
    assert set(model.services) == EXPECTED_SERVICES
    assert model.services["broker"].image == "eclipse-mosquitto:2"


def test_depends_on_names_exist(model: ComposeFile) -> None:
    for name, service in model.services.items():
        missing = set(service.depends_on) - set(model.services)
        assert not missing, f"{name} depends on unknown services {missing}"


def test_mounted_host_paths_and_build_context_exist(model: ComposeFile) -> None:
    for name, service in model.services.items():
        if isinstance(service.build, str):
            assert (ROOT / service.build / "Dockerfile").is_file(), name
        for volume in service.volumes:
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in model.volumes, f"{name} uses undeclared volume {source}"


def test_broker_mounts_the_project_config(model: ComposeFile) -> None:
    volumes = model.services["broker"].volumes
    assert "./broker/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in volumes


def test_every_edvit_command_parses_with_the_real_cli(model: ComposeFile) -> None:
    from edvit.cli import build_parser

    commands = edvit_commands(model)
    assert {name for name, _ in commands} == EXPECTED_SERVICES - {"broker"}
    for name, command in commands:
        parser = build_parser()
        try:
            args = parser.parse_args(command[1:])
        except SystemExit:
            pytest.fail(f"{name}: `{' '.join(command)}` does not parse")
        assert args.broker == FLEET_BROKER, name


def test_deploy_waits_for_every_scaled_node(model: ComposeFile) -> None:
    from edvit.cli import build_parser

    node = model.services["node"]
    deploy = model.services["deploy"]
    assert node.command is not None and deploy.command is not None
    node_args = build_parser().parse_args(node.command[1:])
    deploy_args = build_parser().parse_args(deploy.command[1:])
    assert node_args.id == "auto"  # distinct ids for the replicas of one service
    assert deploy_args.wait_nodes == node.model_extra["scale"] == 3


@pytest.mark.broker
def test_mosquitto_accepts_the_compose_config(tmp_path: Path) -> None:
    binary = mosquitto_path()
    if binary is None:
        pytest.skip("mosquitto is not installed")
    port = find_free_port()
    text = (ROOT / "broker" / "mosquitto.conf").read_text(encoding="utf-8")
    assert "listener 1883 0.0.0.0" in text
    # Same file, but on a free local port and a writable data folder.
    text = text.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1")
    text = text.replace("/mosquitto/data/", f"{tmp_path}/")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text, encoding="utf-8")
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        listening = wait_for_port("127.0.0.1", port, time.monotonic() + 5)
    finally:
        code = stop_process(proc, grace_s=5, name="mosquitto")
        output, _ = proc.communicate()  # exited: only reads what is left in the pipe
    assert listening, output.decode(errors="replace")
    assert code == 0, output.decode(errors="replace")  # a clean stop on SIGINT
    assert b"Error" not in output.split(b"terminating")[0], output.decode(errors="replace")


def _dockerfile_env() -> dict[str, str]:
    """The Dockerfile's `ENV K=V \\` lines (PATH left out: it names the image's venv)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env |= dict(word.split("=", 1) for word in line.split()[1:])
    env.pop("PATH", None)
    return env


@pytest.mark.fleet  # starts python processes
@pytest.mark.skipif(os.geteuid() != 0, reason="runs a model as another user (needs root)")
def test_a_model_loads_without_warnings_as_the_images_homeless_user() -> None:
    """The image's services run as a user without a home: with the Dockerfile's environment,
    loading a model writes nothing to stderr (onnxruntime warns about its telemetry when it
    cannot write under $HOME; the check is that it does without the Dockerfile's ENV)."""
    model = next((ROOT / "fleet" / "bundles").glob("*/submodels/*.onnx"))
    code = (
        "import onnxruntime\n"
        f"onnxruntime.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])\n"
    )
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    base = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent/edvit"}

    def stderr(env: dict[str, str]) -> str:
        done = subprocess.run([*as_nobody, sys.executable, "-c", code], env=env, cwd="/",
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert "telemetry" in stderr(base)  # what every container logged
    assert stderr(base | _dockerfile_env()) == ""
