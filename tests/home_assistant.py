"""A real Home Assistant in a child process, driven through its REST API (for
tests/test_home_assistant.py).

It runs from a virtualenv made by scripts/install-home-assistant.sh, with a configuration of
its own in a temporary folder: only the integrations the test needs (http, api, config,
onboarding, mqtt), and --skip-pip, so it installs nothing. `start` waits for the HTTP API;
`onboard` creates the owner through the onboarding API and logs in; `add_mqtt` configures the
MQTT integration through the config-flow API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from edvit.broker.local import find_free_port

CONFIGURATION = """\
homeassistant:
  name: edvit test
  latitude: 0
  longitude: 0
  elevation: 0
  unit_system: metric
  time_zone: UTC
  currency: EUR
  country: DE
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
config:
onboarding:
logger:
  default: warning
  logs:
    homeassistant.components.mqtt: info
"""


def venv_hass(venv: str | None) -> Path | None:
    """The `hass` of the virtualenv EDVIT_HA_VENV names (None: not given or not there)."""
    if not venv:
        return None
    hass = Path(venv) / "bin" / "hass"
    return hass if hass.exists() else None


class HomeAssistant:
    def __init__(self, hass: Path, config_dir: Path) -> None:
        self.hass = hass
        self.config_dir = config_dir
        self.port = find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = f"{self.url}/"
        self.token: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / "configuration.yaml").write_text(CONFIGURATION.format(port=self.port))

    @property
    def log_path(self) -> Path:
        return self.config_dir / "hass.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout: float = 180.0) -> float:
        """Start it and wait until its API answers; the seconds that took."""
        started = time.monotonic()
        with open(self.log_path, "ab") as out:
            self._process = subprocess.Popen(
                [str(self.hass), "--config", str(self.config_dir), "--skip-pip"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
            )  # fmt: skip
        while time.monotonic() - started < timeout:
            if self._process.poll() is not None:
                raise RuntimeError(f"Home Assistant exited:\n{self.log_tail()}")
            try:
                # Answers once http is up; 401 until logged in, which is "up" too.
                self.request("GET", "/api/onboarding" if self.token is None else "/api/")
                return time.monotonic() - started
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Home Assistant's API not up after {timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def request(self, method: str, path: str, body: object = None, *, form: bool = False) -> object:
        headers = {}
        data = None
        if body is not None:
            if form:
                data = urllib.parse.urlencode(body).encode()  # type: ignore[arg-type]
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        return json.loads(text) if text else None

    def onboard(self) -> None:
        """Create the owner through the onboarding API (what the first page of a new Home
        Assistant does) and exchange its authorization code for an access token. The core
        config step is skipped: it would set up the default integrations (weather, shopping
        list, ...), which this installation leaves out."""
        user = self.request(
            "POST", "/api/onboarding/users",
            {"client_id": self.client_id, "name": "edvit", "username": "edvit",
             "password": "edvit-test-password", "language": "en"},
        )  # fmt: skip
        token = self.request(
            "POST", "/auth/token",
            {"grant_type": "authorization_code", "code": user["auth_code"],  # type: ignore[index]
             "client_id": self.client_id},
            form=True,
        )  # fmt: skip
        self.token = token["access_token"]  # type: ignore[index]
        self.request("POST", "/api/onboarding/analytics", {})

    def add_mqtt(self, host: str, port: int) -> dict:
        """The MQTT integration on host:port (discovery on, prefix `homeassistant`), through
        the config-flow API; the created entry."""
        flow = self.request("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        assert flow["type"] == "form", flow  # type: ignore[index]
        done = self.request(
            "POST", f"/api/config/config_entries/flow/{flow['flow_id']}",  # type: ignore[index]
            {"broker": host, "port": port},
        )  # fmt: skip
        assert done["type"] == "create_entry", done  # type: ignore[index]
        return done  # type: ignore[return-value]

    def states(self) -> list[dict]:
        return self.request("GET", "/api/states")  # type: ignore[return-value]

    def state(self, entity_id: str) -> dict | None:
        try:
            return self.request("GET", f"/api/states/{entity_id}")  # type: ignore[return-value]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
