# Runtime image for every edvit service of compose.yaml (node, aggregator, camera, deploy,
# watch). Runtime dependencies only: no torch/timm, models arrive as ONNX over MQTT.
# BASE: any Debian bookworm image (dataset-fashion-mnist, the camera's frames, is a bookworm
# package). The default comes with Python; on a bare Debian (scripts/docker-local.sh's
# debootstrap image, for machines without a registry) Debian's python3 comes from apt.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

RUN apt-get update \
    && python="" \
    && if ! command -v python3 >/dev/null; then \
        python="python3 python3-venv ca-certificates"; \
    fi \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist $python \
    && rm -rf /var/lib/apt/lists/*

# Passed by scripts/docker-local.sh when the host's pip has them; unset otherwise.
ARG PIP_INDEX_URL
ARG PIP_DEFAULT_TIMEOUT
# ORT_DISABLE_TELEMETRY: onnxruntime's telemetry keeps a device id under $HOME/.cache; the
# services' user has no home, so every container would log "Failed to persist telemetry
# device ID" at its first model. Off, it neither writes nor warns.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ORT_DISABLE_TELEMETRY=1 \
    PATH=/opt/edvit/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md* ./
COPY edvit ./edvit
COPY broker ./broker
COPY edge_node ./edge_node
COPY aggregator ./aggregator
COPY camera_source ./camera_source
COPY models ./models
COPY fleet ./fleet
# A virtualenv: Debian's python3 refuses a system-wide pip install (PEP 668). The system CA
# bundle, not pip's own: it has the host's CAs on the debootstrap base.
RUN python3 -m venv /opt/edvit \
    && PIP_CERT=/etc/ssl/certs/ca-certificates.crt pip install . \
    && rm -rf /src

WORKDIR /
# Services run as an unprivileged user; they only need the network.
RUN useradd --system --no-create-home edvit
USER edvit
CMD ["edvit", "--help"]
