# tdaserve: one image for the API, the GPU workers and the CPU workers.
# Build:  docker build -t tdaserve .          (CUDA torch; add --build-arg TORCH_INDEX=cpu for CPU)
# Run:    docker compose up                    (api + gpu-worker + cpu-worker + redis + flower)
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ARG TORCH_INDEX=cu124
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TDA_DATA_DIR=/data \
    TDA_HOST=0.0.0.0 \
    TDA_PORT=8000

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# torch first (largest layer, changes least); the project's own pin is the CPU wheel
RUN pip install --index-url https://download.pytorch.org/whl/${TORCH_INDEX} torch==2.13.0
COPY pyproject.toml README.md ./
COPY attribution ./attribution
COPY indexer ./indexer
COPY worker ./worker
COPY service ./service
# faiss-gpu when its wheel is available for this CUDA, else faiss-cpu; flower for monitoring
RUN (pip install '.[gpu]' || pip install .) && pip install 'flower>=2.0'

RUN useradd --create-home --uid 1000 tda && mkdir -p /data && chown tda /data
USER tda
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1

# the API by default; workers override the command (see docker-compose.yml)
CMD ["uvicorn", "service.api.main:app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
