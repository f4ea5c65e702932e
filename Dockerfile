# syntax=docker/dockerfile:1
#
# dali-relabel for GPU clusters: Python, torch, one DALI flavour, the package, and its label-pooling
# plugin compiled here with its CUDA backend (sm_80 + sm_90 + PTX).
#
#   docker build -t dali-relabel .
#   docker run --gpus all --ipc=host -v /data:/data dali-relabel dali-relabel demo
#
# CUDA 13 machines (driver >= 580):
#   docker build -t dali-relabel:cuda13 --build-arg CUDA_VERSION=13.0.2 --build-arg DALI_FLAVOUR=cuda130 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
#
# Two stages on the same Ubuntu (so the same Python): "build" (CUDA devel image: nvcc and
# cuda_runtime.h) creates /opt/venv, installs the package the way README.md says, and compiles the
# plugin; "runtime" (CUDA runtime image) gets that very venv (so the same DALI, byte for byte, which
# the plugin's manifest check requires) and the plugin, and runs as a non-root user.

ARG CUDA_VERSION=12.6.3
ARG UBUNTU_VERSION=24.04

# ---------------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build

# The DALI flavour must match the CUDA major version of the base image: cuda120 or cuda130.
ARG DALI_FLAVOUR=cuda120
ARG DALI_VERSION=2.4.0
# PyPI's torch wheels are built for CUDA 13; the CUDA 12 build (cu126) comes from PyTorch's index.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Versions come from the pinned CUDA/Ubuntu base image tag; pinning Ubuntu's package versions as well
# would break the build as soon as the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# Every pip run in this image (and in images built FROM it) keeps these versions: a different torch
# could pull another CUDA, a different DALI would make the plugin unloadable.
RUN printf '%s\n' "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        "nvidia-dali-${DALI_FLAVOUR}==${DALI_VERSION}" > /opt/venv/constraints.txt
ENV PIP_CONSTRAINT=/opt/venv/constraints.txt

# The heavy dependencies get their own layers (kept apart on purpose: a new DALI pin must not download
# torch again), so editing the sources does not download them either.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
# hadolint ignore=DL3059
RUN pip install "nvidia-dali-${DALI_FLAVOUR}==${DALI_VERSION}"

COPY . /opt/dali-relabel
WORKDIR /opt/dali-relabel

# The package, installed exactly as README.md's "Install" section says for each flavour (editable,
# with the test tools, exactly one DALI flavour).
RUN case "${DALI_FLAVOUR}" in \
        cuda120) pip install -e ".[dev]" ;; \
        cuda130) pip install -e ".[cuda130,test]" ;; \
        *) echo "DALI_FLAVOUR must be cuda120 or cuda130, not '${DALI_FLAVOUR}'" >&2; exit 1 ;; \
    esac

# The plugin, with its CUDA backend for A100 (sm_80) and H100 (sm_90) plus PTX for newer GPUs. It is
# built into a throw-away cache, then moved to a fixed, world-readable directory that the runtime
# stage finds through DALI_RELABEL_PLUGIN_DIR; the check loads it with building forbidden.
RUN export XDG_CACHE_HOME=/tmp/dali-relabel-cache \
    && DALI_RELABEL_CUDA_ARCHS="80;90" dali-relabel build-plugin --force \
    && mkdir -p /opt/dali_relabel/plugin \
    && cp "${XDG_CACHE_HOME}"/dali_relabel/plugin/*/libdali_relabel.so \
          "${XDG_CACHE_HOME}"/dali_relabel/plugin/*/manifest.json /opt/dali_relabel/plugin/ \
    && rm -rf "${XDG_CACHE_HOME}" \
    && chmod -R a+rX /opt/dali_relabel \
    && DALI_RELABEL_PLUGIN_DIR=/opt/dali_relabel/plugin DALI_RELABEL_NO_BUILD=1 python -c \
       "from dali_relabel.plugin import load_plugin; m = load_plugin(); assert m['cuda'] and m['directory'] == '/opt/dali_relabel/plugin', m; print('plugin:', m['directory'], 'CUDA archs', m['cuda_archs'])"

# ---------------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime

# Run as this user; build with --build-arg USER_UID=$(id -u) --build-arg USER_GID=$(id -g) so that
# files written to mounted folders belong to you.
ARG USER_UID=1000
ARG USER_GID=1000

LABEL org.opencontainers.image.title="dali-relabel" \
      org.opencontainers.image.description="GPU data loading with ReLabel soft targets on NVIDIA DALI"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive

# python3: the interpreter the venv was made with (same Ubuntu, same version). libibverbs1 and the
# verbs providers: what NCCL's InfiniBand/RoCE transport loads for multi-node training (without them
# it silently falls back to TCP sockets). Versions: see the build stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libibverbs1 ibverbs-providers \
    && rm -rf /var/lib/apt/lists/* \
    && if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && if ! getent group "${USER_GID}" >/dev/null; then groupadd --gid "${USER_GID}" relabel; fi \
    && useradd --create-home --shell /bin/bash --uid "${USER_UID}" --gid "${USER_GID}" relabel

# The very venv the plugin was compiled against (same path: the plugin's rpath points into it).
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/dali_relabel /opt/dali_relabel
COPY --from=build --chown=${USER_UID}:${USER_GID} /opt/dali-relabel /opt/dali-relabel

# DALI_RELABEL_NO_BUILD=1: there is no nvcc here, so a plugin that does not fit (another DALI, edited
# csrc/) must fail with a message saying how to build it instead of a failed compile.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PIP_CONSTRAINT=/opt/venv/constraints.txt \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    DALI_RELABEL_PLUGIN_DIR=/opt/dali_relabel/plugin \
    DALI_RELABEL_NO_BUILD=1

# Numeric, so that Kubernetes' runAsNonRoot and the host can check it without the image's passwd.
USER ${USER_UID}:${USER_GID}
WORKDIR /opt/dali-relabel

# Fail the build here, not on the cluster, if the plugin does not load in this stage.
RUN python -c "from dali_relabel.plugin import load_plugin; m = load_plugin(); assert m['directory'] == '/opt/dali_relabel/plugin', m" \
    && dali-relabel --help >/dev/null

HEALTHCHECK --interval=5m --timeout=2m --start-period=2m --retries=3 \
    CMD ["python", "-c", "from dali_relabel.plugin import load_plugin; load_plugin()"]

CMD ["dali-relabel", "--help"]
