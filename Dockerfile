# megatron_dta on an NVIDIA NGC PyTorch image, which brings CUDA, NCCL, PyTorch, Transformer Engine,
# apex and flash-attn built for each other. Build and run: docs/docker.md.
ARG NGC_TAG=25.04-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

WORKDIR /opt/megatron_dta
ENV PIP_NO_CACHE_DIR=1 \
    PIP_CONSTRAINT=/opt/megatron_dta/image-constraints.txt

# Pin every package the image already has (torch, transformer-engine, apex, flash-attn, ...) so that
# nothing below replaces the image's CUDA builds with generic wheels from PyPI.
RUN pip list --format=freeze | grep -v '^-e ' > image-constraints.txt

# megatron-core and the runtime dependencies, then DeepSpeed for optimizer.backend=deepspeed.
RUN pip install "megatron-core==0.16.1" "safetensors>=0.4,<1" "pyyaml>=6.0,<7" "tqdm>=4.66,<5" \
    && pip install "deepspeed>=0.19,<0.20"

# The project itself without its dependencies: pyproject pins the CPU build of torch used in CI,
# which must not replace the image's.
COPY pyproject.toml README.md ./
COPY megatron_dta ./megatron_dta
COPY configs ./configs
COPY launch ./launch
COPY tools ./tools
RUN pip install --no-deps -e . \
    && python -c "import megatron.core, megatron_dta.cli, transformer_engine, apex" \
    && megatron-dta --help > /dev/null

# models, rollouts and checkpoints come from mounted volumes (docs/docker.md)
CMD ["megatron-dta", "--help"]
