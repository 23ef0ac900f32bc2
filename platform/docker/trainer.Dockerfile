# forgeline trainer: TRL + PEFT + DeepSpeed with a CUDA build of torch (the PyPI wheel
# carries its CUDA libraries; the host needs only the NVIDIA driver). Build from the repo root:
#   docker build -f platform/docker/trainer.Dockerfile -t forgeline/trainer .
#   docker run --gpus all --ipc host -v $PWD/recipes:/recipes forgeline/trainer train /recipes/quickstart.yaml
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# DeepSpeed builds its ops just in time and needs a compiler.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential git && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/forgeline
ARG TORCH=torch==2.13.0
RUN pip install "${TORCH}"
COPY pyproject.toml README.md ./
COPY forgeline ./forgeline
COPY registry ./registry
COPY serving ./serving
COPY training ./training
RUN pip install ".[deepspeed,k8s]"

ENV FORGELINE_HOME=/var/lib/forgeline
ENTRYPOINT ["forgeline"]
