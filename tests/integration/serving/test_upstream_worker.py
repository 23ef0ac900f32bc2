"""Gateway -> upstream worker over real HTTP, with ``forgeline worker`` as the worker.

``forgeline worker`` runs our PyTorch engine in its own process, serving the checkpoint of
a TensorRT-LLM artifact under the name ``trtllm-serve`` would give it (the path of its
MODEL argument), so the gateway's `UpstreamEngine` talks to it exactly as it would to an
H200 worker. The artifact itself is built through the real pipeline with a stand-in
container runtime that runs the real in-container entry point against the ``tensorrt_llm``
test double (tests/support/trtllm_fake): TensorRT-LLM itself is not available here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from registry import lineage
from registry.client import Registry
from serving.artifacts.trtllm_build import RUNTIME_ENV, build_options, build_trtllm_artifact
from serving.artifacts.trtllm_manifest import load_trtllm_manifest
from serving.config import ServeSpec
from serving.engine.upstream import UpstreamEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.server import serve_in_background
from serving.registry_models import registry_catalog
from tests.support.tiny_model import build_tiny_adapter, build_tiny_base

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
FAKE_TRTLLM = REPO / "tests/support/trtllm_fake"
FAKE_DIGEST = "sha256:" + "cd" * 32
MAX_NEW = 400

FAKE_DOCKER = f"""#!{sys.executable}
# Stands in for `docker`: runs the container's command here, with the tensorrt_llm test double.
import json, os, sys
args = sys.argv[1:]
if args[:2] == ["image", "inspect"]:
    print(json.dumps(["nvcr.io/nvidia/tensorrt-llm/release@{FAKE_DIGEST}"]))
    sys.exit(0)
assert args[0] == "run", args
image = next(i for i, a in enumerate(args) if a.startswith("nvcr.io/nvidia/tensorrt-llm/release"))
mounts = [args[i + 1] for i, a in enumerate(args[:image]) if a == "-v"]
command = args[image + 1:]
assert all(src == dst for src, dst in (m.split(":") for m in mounts)), mounts
assert any(command[-1].startswith(m.split(":")[0] + "/") for m in mounts), "the spec is not mounted"
command[0] = sys.executable if command[0] == "python3" else command[0]
os.execve(command[0], command, dict(os.environ, PYTHONPATH={str(FAKE_TRTLLM)!r}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    url: str
    model: str


def start_worker(artifact: Path, name: str, adapter: Path, log: Path) -> Worker:
    port = _free_port()
    argv = [sys.executable, "-m", "forgeline", "worker", "--artifact", str(artifact), "--name", name, "--port", str(port),
            "--device", "cpu", "--adapter", f"support={adapter}", "--max-new-tokens", str(MAX_NEW)]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return Worker(proc, url, name)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"forgeline worker did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop_worker(worker: Worker) -> None:
    if worker.proc.poll() is None:
        worker.proc.send_signal(signal.SIGCONT)
        worker.proc.terminate()
        try:
            worker.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.proc.kill()


@dataclass
class Setup:
    root: Path
    base: Path
    adapter: Path
    artifact: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A tiny base + LoRA adapter, and a bf16 TensorRT-LLM artifact of the base built by the real job path."""
    root = tmp_path_factory.mktemp("upstream")
    base = build_tiny_base(root / "base")
    adapter = build_tiny_adapter(base, root / "adapter")
    docker = root / "bin/docker"
    docker.parent.mkdir()
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(RUNTIME_ENV, str(docker))
        mp.setenv("FORGELINE_HOME", str(root / "home"))
        _, manifest = build_trtllm_artifact(str(base), None, root / "trtllm", build_options(smoke_test=False), name="tiny-v1")
    assert manifest is not None and manifest.tensorrt_llm.image_digest == FAKE_DIGEST
    yield Setup(root, base, adapter, root / "trtllm")


class WorkerHandle:
    """The module's worker; the crash test kills it, and the next test to need it restarts it."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.current: Worker | None = None
        self.starts = 0

    def get(self) -> Worker:
        if self.current is None or self.current.proc.poll() is not None:
            checkpoint = self.setup.artifact / "checkpoint"
            self.starts += 1
            self.current = start_worker(checkpoint, str(checkpoint), self.setup.adapter, self.setup.root / f"worker-{self.starts}.log")
        return self.current


@pytest.fixture(scope="module")
def workers(setup: Setup) -> Iterator[WorkerHandle]:
    handle = WorkerHandle(setup)
    yield handle
    if handle.current is not None:
        stop_worker(handle.current)


@pytest.fixture
def worker(workers: WorkerHandle) -> Worker:
    """``forgeline worker`` on the artifact's checkpoint, named as trtllm-serve would name it."""
    return workers.get()


def _gateway(engine: UpstreamEngine, name: str = "tiny-up") -> tuple[str, object]:
    app = create_app(StaticCatalog([ServedModel(name=name, version="1", engine=engine, artifact="upstream")]), max_new_tokens=MAX_NEW)
    return serve_in_background(app)


@pytest.fixture
def gateway(worker: Worker, setup: Setup) -> Iterator[str]:
    engine = UpstreamEngine(
        worker.url, worker.model, tokenizer=setup.artifact / "checkpoint", adapter_mode="model", adapter_model_template="{model}:{adapter}"
    )
    url, stop = _gateway(engine)
    yield url
    stop()  # type: ignore[operator]


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_non_streaming_answer_is_the_workers(gateway: str, worker: Worker) -> None:
    via_gateway = _client(gateway).completions.create(model="tiny-up", prompt="Hello, world!", max_tokens=12, temperature=0)
    direct = _client(worker.url).completions.create(model=worker.model, prompt="Hello, world!", max_tokens=12, temperature=0)
    assert via_gateway.choices[0].text == direct.choices[0].text and via_gateway.choices[0].text
    assert via_gateway.choices[0].finish_reason == direct.choices[0].finish_reason == "length"
    assert via_gateway.usage is not None and direct.usage is not None
    assert via_gateway.usage.completion_tokens == direct.usage.completion_tokens == 12
    assert via_gateway.usage.prompt_tokens == direct.usage.prompt_tokens


def test_streaming_is_relayed_chunk_by_chunk(gateway: str, worker: Worker) -> None:
    client = _client(gateway)
    stream = client.completions.create(
        model="tiny-up", prompt="Hello, world!", max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    events = list(stream)
    texts = [e.choices[0].text for e in events if e.choices]
    direct = _client(worker.url).completions.create(model=worker.model, prompt="Hello, world!", max_tokens=24, temperature=0)
    assert "".join(texts) == direct.choices[0].text
    assert len([t for t in texts if t]) > 3, "the answer arrived in one piece, not streamed"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 24
    chat = client.chat.completions.create(model="tiny-up", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.usage is not None and chat.usage.completion_tokens == 8


def test_adapter_is_selected_on_the_worker(gateway: str, worker: Worker) -> None:
    client = _client(gateway)
    base = client.completions.create(model="tiny-up", prompt="Hello, world!", max_tokens=12, temperature=0).choices[0].text
    tuned = client.completions.create(model="tiny-up:support", prompt="Hello, world!", max_tokens=12, temperature=0).choices[0].text
    direct = _client(worker.url).completions.create(model=f"{worker.model}:support", prompt="Hello, world!", max_tokens=12, temperature=0)
    assert tuned == direct.choices[0].text
    assert tuned != base, "the adapter did not change the output"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-up:nope", prompt="Hello", max_tokens=4)


def test_registry_version_built_by_the_pipeline_and_served_through_a_worker(
    worker: Worker, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forgeline import pipeline

    monkeypatch.setenv(RUNTIME_ENV, str(setup.root / "bin/docker"))
    registry = Registry()
    try:
        info = registry.create_version(
            "tiny", source=str(setup.adapter), run_id=None, tags={lineage.BASE_MODEL: str(setup.base), lineage.ADAPTER: "lora"}
        )
        options = build_options(multi_lora=True, smoke_test=False)
        prepared = pipeline.build(registry, f"tiny@{info.version}", target="tensorrt-llm", trtllm=options, runner="none")
        assert prepared.pending and lineage.engine_tag("tensorrt-llm") not in prepared.version.tags
        built = pipeline.build(registry, f"tiny@{info.version}", target="tensorrt-llm", trtllm=options, runner="local")
        assert not built.pending and built.version.tags[lineage.engine_tag("tensorrt-llm")] == built.artifact_uri
        manifest = load_trtllm_manifest(built.path)
        assert manifest.adapters == {f"tiny-v{info.version}": f"adapters/tiny-v{info.version}"}
        assert manifest.tensorrt_llm.image_digest == FAKE_DIGEST and manifest.tensorrt_llm.digest_source == "runtime"

        # The same build as a job (kind local: the container command, detached), followed by id, then recorded.
        from jobs import submission
        from jobs.base import JobPhase
        from jobs.config import ClusterSpec

        as_job = pipeline.build(registry, f"tiny@{info.version}", target="tensorrt-llm", trtllm=options, cluster=ClusterSpec())
        assert as_job.pending and as_job.job is not None and (as_job.job.stage, as_job.job.name) == ("build", "tiny")
        handle = submission.submit(as_job.job)
        record = submission.wait(handle.id, poll_s=0.5, timeout_s=300)
        assert record.status.phase is JobPhase.SUCCEEDED, submission.job_logs(handle.id)
        rebuilt = pipeline.build(registry, f"tiny@{info.version}", target="tensorrt-llm", finalize=True)
        assert rebuilt.artifact_uri == built.artifact_uri and load_trtllm_manifest(rebuilt.path).adapters == manifest.adapters

        # The worker holds the same base checkpoint, mounted at setup.artifact.
        spec = ServeSpec(engine="upstream", upstream_url=worker.url, upstream_artifact_dir=str(setup.artifact))
        app = create_app(registry_catalog(registry, [f"tiny@{info.version}"], spec=spec), max_new_tokens=MAX_NEW)
        url, stop = serve_in_background(app)
        try:
            assert httpx.get(f"{url}/ready").json()["models"] == {f"tiny@{info.version}": True}
            client = _client(url)
            raw = client.completions.with_raw_response.create(model=f"tiny@{info.version}", prompt="Hello", max_tokens=6, temperature=0)
            assert raw.headers["x-forgeline-engine-artifact"] == built.artifact_uri
            assert raw.parse().usage.completion_tokens == 6
            # The adapter goes out as TensorRT-LLM's lora_request; forgeline worker does not take one and says so.
            with pytest.raises(openai.BadRequestError, match="lora_request"):
                client.completions.create(model=f"tiny@{info.version}:tiny-v{info.version}", prompt="Hello", max_tokens=4)
        finally:
            stop()  # type: ignore[operator]
    finally:
        registry.close()


def _stream_until_error(url: str, max_tokens: int, on_first_chunk: object) -> tuple[list[str], float]:
    """Stream from the gateway; call ``on_first_chunk`` once; return every SSE payload and the seconds it took."""
    payloads: list[str] = []
    started = time.monotonic()
    body = {"model": "tiny-up", "prompt": "Hello, world!", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            payloads.append(line[5:].strip())
            if len(payloads) == 1:
                on_first_chunk()  # type: ignore[operator]
    return payloads, time.monotonic() - started


def test_worker_that_stops_answering_mid_stream_gives_an_error_not_a_hang(worker: Worker, setup: Setup) -> None:
    engine = UpstreamEngine(worker.url, worker.model, tokenizer=setup.artifact / "checkpoint", read_timeout=2.0)
    url, stop = _gateway(engine)
    try:
        payloads, seconds = _stream_until_error(url, MAX_NEW, lambda: worker.proc.send_signal(signal.SIGSTOP))
    finally:
        worker.proc.send_signal(signal.SIGCONT)
        stop()  # type: ignore[operator]
    assert payloads[-1] == "[DONE]" and seconds < 30
    error = json.loads(payloads[-2])["error"]
    assert "no data for 2 s" in error["message"] and error["code"] == "unavailable"


def test_worker_crash_mid_stream_gives_an_error_not_a_hang(worker: Worker, setup: Setup) -> None:
    engine = UpstreamEngine(worker.url, worker.model, tokenizer=setup.artifact / "checkpoint")
    url, stop = _gateway(engine)

    def crash() -> None:
        worker.proc.send_signal(signal.SIGSTOP)  # freeze it first, so it cannot finish the answer meanwhile
        worker.proc.kill()

    try:
        payloads, seconds = _stream_until_error(url, MAX_NEW, crash)
    finally:
        stop()  # type: ignore[operator]
    assert payloads[-1] == "[DONE]" and seconds < 30
    error = json.loads(payloads[-2])["error"]
    assert "stream broke" in error["message"] and error["type"] == "server_error"
    texts = [json.loads(p)["choices"][0]["text"] for p in payloads[:-2]]
    assert len(texts) < MAX_NEW, "the worker finished before it crashed"
