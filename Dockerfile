# pathapp: DINOv2 vision transformers on whole-slide images, as a container.
# The same image is the CLI, the Cytomine app (descriptor.json job, descriptor.yml App Engine task)
# and the QuPath launcher's "container" backend.
#
#   Bundle (required): put the model bundle in models/ and name it:
#                   docker build --build-arg MODEL_BUNDLE=tumor.pathapp -t pathapp .
#                   The App Engine mounts only /inputs and /outputs, so the task's model must be in
#                   the image: it is /models/tumor.pathapp, the task's default model. The build
#                   fails without MODEL_BUNDLE (in the last layers, so that a new bundle reuses
#                   every cached layer before them). More bundles can be mounted at run time:
#                   docker run -v /path/to/bundles:/models ... (this hides the baked one).
#   NVIDIA GPU:     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
#                   (the CUDA wheels bring their own CUDA runtime; the host needs the driver and
#                   the NVIDIA container toolkit: docker run --gpus all ...)
#   Another base:   --build-arg BASE_IMAGE=...   (any Debian/Ubuntu image with Python 3.11 as `python`)
#   App Engine:     build with -t <namespace as a/b/c>:<version> --provenance=false --sbom=false,
#                   docker save it as <namespace>-<version>.tar, then `pathapp cytomine bundle` (README).
#
# With no arguments the container runs the App Engine task (/inputs -> /outputs); with arguments
# it is the pathapp CLI (docker/entrypoint.sh).
#
# Layers run from least to most often changed: torch, QuPath, dependencies, then our code.

ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PAQUO_VERSION=0.9.0
ARG QUPATH_VERSION=0.6.0

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
COPY docker/entrypoint.sh /usr/local/bin/pathapp-entrypoint
# The bundle is declared here, after the dependency layers: changing it rebuilds only what follows.
ARG MODEL_BUNDLE
COPY models/ /models/
RUN test -n "${MODEL_BUNDLE}" \
    || { echo "error: name the model bundle to bake in: docker build --build-arg MODEL_BUNDLE=<file in models/> ." >&2; exit 1; }
RUN test -f "/models/${MODEL_BUNDLE}" \
    || { echo "error: models/${MODEL_BUNDLE} is not in the build context; put the bundle in models/" >&2; exit 1; }
ENV PATHAPP_DEFAULT_MODEL=${MODEL_BUNDLE}

USER 1000:1000
WORKDIR /data
ENTRYPOINT ["/usr/local/bin/pathapp-entrypoint"]
