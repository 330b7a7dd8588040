# vistune serve in a container: CPU-only torch, vistune with the serve extra, one service per
# container (each holds one backbone in memory; run more containers for more throughput).
#
#   docker build -t vistune-serve .
#   docker run --rm -p 8000:8000 -v "$PWD/runs:/runs:ro" -v "$PWD/serve.yaml:/config/serve.yaml:ro" vistune-serve
#
# serve.yaml is a `vistune serve --config` file (README, "Serve"); its task paths are relative to
# its own folder, so inside the container write them as /runs/... . `docker stop` sends SIGTERM:
# the service stops accepting, answers every admitted request, and exits 0.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1

# The CPU build of torch first (the default wheels bring the CUDA libraries, several GB); the same
# versions scripts/setup_venv.sh installs. pip then finds torch already satisfied for vistune.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/vistune
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[serve]"

# A user without a login or a home to write to: the service only reads its task files.
RUN useradd --system --uid 10001 --no-create-home vistune
USER vistune

EXPOSE 8000
STOPSIGNAL SIGTERM
# Liveness: /health answers 200 while the process serves (a load balancer should use /ready).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["vistune", "serve"]
# --host 0.0.0.0: reachable through the published port (the default 127.0.0.1 is not, from outside
# the container). Flags after the image name replace this CMD (e.g. `--config /config/other.yaml`).
CMD ["--config", "/config/serve.yaml", "--host", "0.0.0.0", "--port", "8000"]
