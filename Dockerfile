# syntax=docker/dockerfile:1
#
# dali-relabel for GPU clusters: Python, torch, one DALI flavour, the package, and its label-pooling
# plugin compiled here with its CUDA backend (sm_80 + sm_90 + PTX by default).
#
#   docker build -t dali-relabel .
#   docker run --gpus all --ipc=host -v /data:/data dali-relabel dali-relabel demo
#
# CUDA 13 machines (driver >= 580; newer GPUs such as Blackwell): the other DALI flavour on CUDA 13
# base images, see README.md ("Docker and clusters") for the full command:
#   docker build -t dali-relabel:cuda13 \
#     --build-arg BUILD_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04 \
#     --build-arg DALI_FLAVOUR=cuda130 --build-arg TORCH_CUDA=cu130 --build-arg CUDA_ARCHS="80;90;100;120" .
#
# Two stages on the same Ubuntu (so the same Python): "build" (CUDA devel image: nvcc and
# cuda_runtime.h) creates /opt/venv, installs the package the way README.md says, and compiles the
# plugin; "runtime" (CUDA runtime image) gets that very venv (so the same DALI, byte for byte, which
# the plugin's manifest check requires) and the plugin, and runs as a non-root user under tini.

# Base images by tag and digest (the multi-arch index digests of these tags as pinned by several
# public projects; Docker Hub could not be reached to re-check them when they were written here:
# `docker buildx imagetools inspect <tag>` shows the current ones). Both must be the same Ubuntu.
# To use other images, pass both references; a digest always wins over the tag before it.
ARG BUILD_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04@sha256:392c0df7b577ecae17a17f6ba7f2009c217bb4422f8431c053ae9af61a8c148a
ARG RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04@sha256:92906d87596d638d35015c6353053121bd299d25943b875763321653884ba924

# ---------------------------------------------------------------------------------------------------
FROM ${BUILD_IMAGE} AS build

# The DALI flavour must match the CUDA major version of the base image: cuda120 or cuda130.
ARG DALI_FLAVOUR=cuda120
ARG DALI_VERSION=2.4.0
# PyPI's torch wheels are built for CUDA 13; the CUDA 12 build (cu126) comes from PyTorch's index,
# and its wheels carry the build in their version (torch 2.14.1+cu126).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_CUDA=cu126
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}
# GPU architectures the plugin's kernel is compiled for, plus PTX of the last one (JIT for newer GPUs).
ARG CUDA_ARCHS="80;90"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The base image's CUDA (its CUDA_VERSION), the DALI flavour and torch's CUDA build must agree.
RUN cuda_major="${CUDA_VERSION%%.*}" \
    && case "${DALI_FLAVOUR} ${TORCH_CUDA}" in \
        "cuda${cuda_major}0 cu${cuda_major}"*) ;; \
        *) echo "the base image has CUDA ${CUDA_VERSION}: it needs DALI_FLAVOUR=cuda${cuda_major}0 and" \
                "TORCH_CUDA=cu${cuda_major}x, not ${DALI_FLAVOUR} and ${TORCH_CUDA}" >&2; exit 1 ;; \
    esac

# Versions come from the pinned CUDA/Ubuntu base image; pinning Ubuntu's package versions as well
# would break the build as soon as the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# Every pip run in this image (and in images built FROM it) keeps these versions: another torch build
# (PyPI's 2.14.1 is a CUDA 13 build of the same version number) could pull another CUDA, a different
# DALI would make the plugin unloadable.
RUN printf '%s\n' "torch==${TORCH_VERSION}+${TORCH_CUDA}" "torchvision==${TORCHVISION_VERSION}+${TORCH_CUDA}" \
        "nvidia-dali-${DALI_FLAVOUR}==${DALI_VERSION}" > /opt/venv/constraints.txt
ENV PIP_CONSTRAINT=/opt/venv/constraints.txt

# The heavy dependencies get their own layers (kept apart on purpose: a new DALI pin must not download
# torch again), so editing the sources does not download them either.
RUN pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}+${TORCH_CUDA}" "torchvision==${TORCHVISION_VERSION}+${TORCH_CUDA}"
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

# The plugin, with its CUDA backend for CUDA_ARCHS (A100 sm_80 and H100 sm_90 by default) plus PTX of
# the last one. It is built into a throw-away cache, then moved to a fixed, world-readable directory
# that the runtime stage finds through DALI_RELABEL_PLUGIN_DIR; the check loads it with building
# forbidden.
RUN export XDG_CACHE_HOME=/tmp/dali-relabel-cache \
    && DALI_RELABEL_CUDA_ARCHS="${CUDA_ARCHS}" dali-relabel build-plugin --force \
    && mkdir -p /opt/dali_relabel/plugin \
    && cp "${XDG_CACHE_HOME}"/dali_relabel/plugin/*/libdali_relabel.so \
          "${XDG_CACHE_HOME}"/dali_relabel/plugin/*/manifest.json /opt/dali_relabel/plugin/ \
    && rm -rf "${XDG_CACHE_HOME}" \
    && chmod -R a+rX /opt/dali_relabel \
    && DALI_RELABEL_PLUGIN_DIR=/opt/dali_relabel/plugin DALI_RELABEL_NO_BUILD=1 python -c \
       "from dali_relabel.ops.plugin import check_registered; m = check_registered(); assert m['cuda'] and m['directory'] == '/opt/dali_relabel/plugin', m; print('plugin:', m['directory'], 'CUDA archs', m['cuda_archs'])"

# ---------------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime

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
# it silently falls back to TCP sockets). tini: the entrypoint, a PID 1 that forwards signals and
# reaps the zombies torchrun's and DALI's worker processes leave. Versions: see the build stage.
# /tmp/dali-relabel-cache: caches for any uid (sticky and world-writable, like /tmp).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libibverbs1 ibverbs-providers tini \
    && rm -rf /var/lib/apt/lists/* \
    && if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && if ! getent group "${USER_GID}" >/dev/null; then groupadd --gid "${USER_GID}" relabel; fi \
    && useradd --create-home --shell /bin/bash --uid "${USER_UID}" --gid "${USER_GID}" relabel \
    && install -d -m 1777 /tmp/dali-relabel-cache

# The very venv the plugin was compiled against (same path: the plugin's rpath points into it).
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/dali_relabel /opt/dali_relabel
COPY --from=build --chown=${USER_UID}:${USER_GID} /opt/dali-relabel /opt/dali-relabel

# DALI_RELABEL_NO_BUILD=1: there is no nvcc here, so a plugin that does not fit (another DALI, edited
# csrc/) must fail with a message saying how to build it instead of a failed compile.
# NVIDIA_DRIVER_CAPABILITIES: "video" makes the NVIDIA Container Toolkit mount the driver libraries
# that DALI's hardware JPEG decoder (A100/H100 nvJPEG engines, device="mixed") needs.
# XDG_CACHE_HOME, MPLCONFIGDIR: writable for any --user (an unknown uid has HOME=/).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PIP_CONSTRAINT=/opt/venv/constraints.txt \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    DALI_RELABEL_PLUGIN_DIR=/opt/dali_relabel/plugin \
    DALI_RELABEL_NO_BUILD=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,video \
    XDG_CACHE_HOME=/tmp/dali-relabel-cache \
    MPLCONFIGDIR=/tmp/dali-relabel-cache/matplotlib

# Numeric, so that Kubernetes' runAsNonRoot and the host can check it without the image's passwd.
USER ${USER_UID}:${USER_GID}
WORKDIR /opt/dali-relabel

# Fail the build here, not on the cluster, if the plugin does not load in this stage.
RUN python -c "from dali_relabel.ops.plugin import check_registered; m = check_registered(); assert m['directory'] == '/opt/dali_relabel/plugin', m" \
    && dali-relabel --help >/dev/null

# Loads the plugin into DALI and checks that its operators are registered (no GPU, no pipeline).
HEALTHCHECK --interval=5m --timeout=2m --start-period=2m --retries=3 \
    CMD ["python", "-c", "from dali_relabel.ops.plugin import check_registered; check_registered()"]

# -s: also reaps when tini is not PID 1 (docker run --init puts its own init first).
ENTRYPOINT ["/usr/bin/tini", "-s", "--"]
CMD ["dali-relabel", "--help"]
