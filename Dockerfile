# megatron_dta images, two targets built by the same steps (docs/docker.md):
#   gpu  BASE is an NVIDIA NGC PyTorch image (the default), which brings CUDA, NCCL, torch, Transformer
#        Engine, apex and flash-attn built for each other; nothing of the base is replaced.
#          docker build --target gpu -t megatron-dta:gpu .
#   cpu  BASE is any Debian/Ubuntu image with python3 and its venv module; torch is the CPU wheel put
#        in docker/wheels/ (PyPI's default torch is the multi-GB CUDA build).
#          docker build --target cpu --build-arg BASE=python:3.11-slim-bookworm -t megatron-dta:cpu .
# Needs BuildKit (RUN --mount, and only the chosen target's stages are built). pip's settings for the
# build (index, CA bundle) come in as the optional secrets pip_conf and pip_cert, never stored in a
# layer; tools/docker_check.sh writes them from this machine's pip configuration.
ARG BASE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE} AS common

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# The python environment, /opt/venv. A base that brings torch (NGC) gets a venv that sees its packages,
# every one pinned by PIP_CONSTRAINT (in the build and for users' own installs), so nothing below
# replaces the base's CUDA builds; `python -m pip` is then the base's pip (NGC may lack ensurepip)
# installing into the venv. A plain python3 base gets an empty venv and the torch wheel from
# docker/wheels/, bind-mounted so that the wheel is not stored in a layer. Missing secrets are not
# mounted, and pip ignores a PIP_CONFIG_FILE that does not exist.
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_cert \
    export PIP_CONFIG_FILE=/run/secrets/pip_conf \
    && if python3 -c "import torch" 2>/dev/null; then \
        python3 -m venv --system-site-packages --without-pip /opt/venv; \
    else \
        ls /wheels/torch-*.whl > /dev/null \
            || { echo "docker/wheels/ has no torch wheel (docs/docker.md)" >&2; exit 1; }; \
        python3 -m venv /opt/venv && python -m pip install /wheels/torch-*.whl; \
    fi \
    && python -m pip list --format=freeze | grep -v '^-e ' > /opt/venv/constraints.txt
ENV PIP_CONSTRAINT=/opt/venv/constraints.txt

# Dependencies before the source, so that a code change rebuilds only the small layers below them:
# the project's runtime requirements, DeepSpeed and transformers (to load exports), read from
# pyproject.toml. torch is the base's or the wheel's; wheels in docker/wheels/ are candidates too.
WORKDIR /opt/megatron_dta
COPY pyproject.toml ./
COPY docker/requirements.py docker/
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_cert \
    python docker/requirements.py pyproject.toml > /opt/venv/requirements.txt \
    && PIP_CONFIG_FILE=/run/secrets/pip_conf \
        python -m pip install --find-links /wheels -r /opt/venv/requirements.txt

# The user the image runs as. Its home is /work, the mount point for run directories, so whatever it
# writes (runs, caches) lands in a volume; the rest of the file system can be mounted read-only.
RUN useradd --home-dir /work --no-create-home --shell /bin/bash dta \
    && mkdir /work && chown dta:dta /work

# The project itself, without dependencies (pyproject pins the CPU build of torch used in CI).
COPY README.md ./
COPY configs ./configs
COPY launch ./launch
COPY tools ./tools
COPY megatron_dta ./megatron_dta
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_cert \
    PIP_CONFIG_FILE=/run/secrets/pip_conf python -m pip install --no-deps -e . \
    && python -c "import megatron.core, deepspeed, transformers, megatron_dta.cli" \
    && python -m compileall -q megatron_dta \
    && megatron-dta --help > /dev/null

USER dta
WORKDIR /work
VOLUME /work
# models, rollouts and checkpoints come from mounted volumes (docs/docker.md)
CMD ["megatron-dta", "--help"]

# The CPU image checks that torch is the CPU build (no multi-GB CUDA build pulled by a dependency).
FROM common AS cpu
RUN python -c "import torch; assert torch.version.cuda is None, f'torch {torch.__version__} is a CUDA build'"

# The GPU image (last: the default target) checks that the base's CUDA stack is there, so a wrong BASE
# fails the build.
FROM common AS gpu
RUN python -c "import torch, transformer_engine, apex; assert torch.version.cuda, 'torch without CUDA'"
