# forgeline gateway: OpenAI-compatible API, keys, quotas, metrics; PyTorch engine on CPU or
# relays to TensorRT-LLM workers (`serve.engine: upstream`). Build from the repo root:
#   docker build -f platform/docker/gateway.Dockerfile -t forgeline/gateway .
#   docker run -p 8000:8000 -e MLFLOW_TRACKING_URI=http://mlflow:5000 forgeline/gateway --model quickstart@production
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /opt/forgeline
# CPU torch: a gateway that relays to GPU workers needs no CUDA; the CPU wheel is ~10x smaller.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY forgeline ./forgeline
COPY registry ./registry
COPY serving ./serving
COPY training ./training
RUN pip install ".[redis]"

RUN useradd --create-home forgeline
USER forgeline
ENV FORGELINE_HOME=/home/forgeline/.forgeline
EXPOSE 8000
ENTRYPOINT ["forgeline", "serve", "--host", "0.0.0.0", "--port", "8000"]
