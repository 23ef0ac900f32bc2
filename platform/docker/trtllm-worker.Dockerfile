# TensorRT-LLM worker: NVIDIA's release image plus forgeline's in-container entry point.
# The base image is pinned in serving/artifacts/trtllm_version.py only; pass it in:
#   docker build -f platform/docker/trtllm-worker.Dockerfile \
#     --build-arg TRTLLM_IMAGE=$(python -c 'from serving.artifacts.trtllm_version import image_reference; print(image_reference())') \
#     -t forgeline/trtllm-worker:1.2.1 .
# Run it with a built artifact mounted at /artifact (it execs the artifact's trtllm-serve argv):
#   docker run --gpus all --ipc host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v $FORGELINE_HOME/engines/NAME/VERSION/tensorrt-llm:/artifact:ro -p 8000:8000 forgeline/trtllm-worker:1.2.1
ARG TRTLLM_IMAGE
FROM ${TRTLLM_IMAGE}

# Only the standard library and tensorrt_llm are imported by the entry point: nothing to install.
COPY serving/artifacts/trtllm_entry.py /opt/forgeline/trtllm_entry.py

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s \
  CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
ENTRYPOINT ["python3", "/opt/forgeline/trtllm_entry.py", "serve", "--artifact", "/artifact"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
