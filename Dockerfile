# pathapp: DINOv2 vision transformers on whole-slide images, as a container.
# The same image is the CLI, the Cytomine app (descriptor.json job, descriptor.yml task) and the
# QuPath launcher's "container" backend.
#
#   CPU (default):  docker build -t pathapp .
#   NVIDIA GPU:     docker build -t pathapp:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
#                   (the CUDA wheels bring their own CUDA runtime; the host needs the driver and
#                   the NVIDIA container toolkit: docker run --gpus all ...)
#   Another base:   --build-arg BASE_IMAGE=...   (any Debian/Ubuntu image with Python 3.11 as `python`)
#   Bake bundles:   put *.pathapp files in models/ (or --build-arg MODELS_SRC=other/dir); otherwise
#                   mount them at run time: docker run -v /path/to/bundles:/models ...
#
# Layers run from least to most often changed: torch, QuPath, dependencies, then our code.

ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PAQUO_VERSION=0.9.0
ARG QUPATH_VERSION=0.6.0
ARG MODELS_SRC=models

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PAQUO_QUPATH_DIR=/opt/qupath/QuPath-${QUPATH_VERSION} \
    PATHAPP_MODELS=/models \
    MPLCONFIGDIR=/tmp/matplotlib

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin pathapp

# torch first: the biggest layer, and the one the CPU/CUDA choice changes (kept apart for caching).
# hadolint ignore=DL3059
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# QuPath for the paquo bridge (downloaded at build time; the archive is removed in the same layer).
RUN pip install --no-cache-dir "paquo==${PAQUO_VERSION}" \
    && mkdir -p /opt/qupath /tmp/qupath-download \
    && python -m paquo get_qupath --install-path /opt/qupath --download-path /tmp/qupath-download "${QUPATH_VERSION}" \
    && rm -rf /tmp/qupath-download \
    && test -d "${PAQUO_QUPATH_DIR}"

WORKDIR /app

# Dependencies from pyproject.toml only (torch is already in), so a code change reuses this layer.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith(('torch=', 'torchvision='))))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY src ./src
RUN pip install --no-cache-dir --no-deps . \
    && pathapp --version

COPY descriptor.json descriptor.yml /app/
COPY ${MODELS_SRC}/ /models/

USER 1000:1000
WORKDIR /data
ENTRYPOINT ["pathapp"]
CMD ["--help"]
