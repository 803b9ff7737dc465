# Kiln on CPU: `docker compose up` trains the demo's model once and serves it (docs/serve.md).
# Building needs network access: Docker Hub for the base image, PyPI and download.pytorch.org for wheels.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU wheel first, pinned as the Makefile's TORCH_SPEC: Kiln's `torch>=2.4` is then already met,
# so pip never pulls PyPI's multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY kiln ./kiln
RUN pip install . && rm -rf /src

# /data belongs to the user, so that a fresh named volume mounted there starts writable by it.
RUN useradd --create-home --uid 1000 kiln && mkdir /data && chown kiln:kiln /data
USER kiln
WORKDIR /data
# Downloaded data sets and tokenizer files are cached in the volume, beside the models.
ENV XDG_CACHE_HOME=/data/cache

EXPOSE 8000
ENTRYPOINT ["kiln"]
CMD ["--help"]
