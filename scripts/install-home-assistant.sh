#!/usr/bin/env bash
# Installs Home Assistant 2024.1 into a virtualenv of its own, for the opt-in test that runs
# a real Home Assistant against a real mosquitto (tests/test_home_assistant.py).
#
#   scripts/install-home-assistant.sh [VENV]      (default ~/.cache/edvit/home-assistant)
#   EDVIT_HA_VENV=VENV .venv/bin/pytest tests/test_home_assistant.py
#
# Needs Python 3.11 (Home Assistant 2024.1 supports 3.11 and 3.12) and PyPI. The Bluetooth
# libraries are pinned to the versions 2024.1 was released with: left free, pip picks newer
# ones that no longer import with it. Only the integrations the test loads are installed
# (http, api, config, onboarding, person, mqtt), and the test starts Home Assistant with
# --skip-pip, so it never installs anything at run time.
set -euo pipefail

VENV="${1:-${EDVIT_HA_VENV:-$HOME/.cache/edvit/home-assistant}}"
PYTHON="${PYTHON:-python3.11}"
HA_VERSION="${HA_VERSION:-2024.1.6}"

command -v "$PYTHON" >/dev/null || { echo "$PYTHON not found (Home Assistant 2024.1 needs 3.11)" >&2; exit 2; }

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
cat >"$constraints" <<'EOF'
habluetooth==2.1.0
bluetooth-data-tools==1.19.0
bleak==0.21.1
bleak-retry-connector==3.4.0
bluetooth-adapters==0.17.0
dbus-fast==2.21.0
EOF

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip wheel
# homeassistant, then the requirements of the integrations the test loads (their manifest.json
# names them; Home Assistant would otherwise pip-install them at its first start).
"$VENV/bin/pip" install -q -c "$constraints" "homeassistant==$HA_VERSION"
requirements="$("$VENV/bin/python" - <<'EOF'
import json
from pathlib import Path

import homeassistant.components as components

root = Path(components.__path__[0])
wanted, seen = ["http", "api", "config", "onboarding", "person", "mqtt"], set()
requirements = []
while wanted:
    name = wanted.pop()
    if name in seen:
        continue
    seen.add(name)
    manifest = json.loads((root / name / "manifest.json").read_text())
    requirements += manifest.get("requirements", [])
    wanted += manifest.get("dependencies", []) + manifest.get("after_dependencies", [])
print(" ".join(sorted(set(requirements))))
EOF
)"
if [ -n "$requirements" ]; then
    # shellcheck disable=SC2086  # one word per requirement
    "$VENV/bin/pip" install -q -c "$constraints" $requirements
fi
"$VENV/bin/hass" --version
echo "Home Assistant installed in $VENV; run: EDVIT_HA_VENV=$VENV .venv/bin/pytest tests/test_home_assistant.py"
