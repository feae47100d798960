# Runtime image for every edvit service of compose.yaml (node, aggregator, camera, deploy,
# watch). Runtime dependencies only: no torch/timm, models arrive as ONNX over MQTT.
# bookworm pinned: dataset-fashion-mnist (the camera's frames) is a bookworm package.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md* ./
COPY edvit ./edvit
COPY broker ./broker
COPY edge_node ./edge_node
COPY aggregator ./aggregator
COPY camera_source ./camera_source
COPY models ./models
COPY fleet ./fleet
RUN pip install . && rm -rf /src

WORKDIR /
# Services run as an unprivileged user; they only need the network.
RUN useradd --system --no-create-home edvit
USER edvit
CMD ["edvit", "--help"]
