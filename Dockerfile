# fedtune: the coordinator and the client agent in one image (CPU).
#   docker build -t fedtune .
#   docker run --rm fedtune --help
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    FEDTUNE_LOG_FORMAT=json

# The CPU build of torch first: PyPI's default wheel brings ~6 GB of CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.2"

WORKDIR /opt/fedtune
COPY pyproject.toml README.md ./
COPY fedtune ./fedtune
RUN pip install . && fedtune --version

# An unprivileged user; /pki and /runs belong to it, so named volumes mounted there do too.
RUN useradd --create-home --uid 10001 fedtune && mkdir -p /pki /runs /data && chown fedtune /pki /runs /data
USER fedtune
WORKDIR /home/fedtune

EXPOSE 7070
# Health: `fedtune health --coordinator 127.0.0.1:7070 [TLS flags]` (see docker-compose.yml).
ENTRYPOINT ["fedtune"]
CMD ["--help"]
