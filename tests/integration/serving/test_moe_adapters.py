"""A Qwen2-MoE base served with registry LoRA versions routed onto it by name: no 500s.

Real MLflow registry (SQLite), the gateway `forgeline serve --base` builds, uvicorn on
loopback and the stock ``openai`` SDK. Three fine-tunes share the base: one on attention,
one ``all-linear`` (its shared-expert LoRA sees flattened MoE tokens) and one on the fused
routed experts (PEFT cannot batch it per row). 100 concurrent requests mix them with the
bare base; before the fix, the first adapter request made every later one a 500.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import pytest
from mlflow import MlflowClient

from registry import lineage
from registry.audit import AuditLog
from registry.client import Registry
from serving.config import ServeSpec
from serving.gateway.server import serve_in_background
from serving.registry_models import BaseSource
from serving.service import build_gateway
from tests.support.families import build_family
from tests.support.lora import MOE_TARGETS, build_lora

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = "tiny-moe"
REQUESTS = 100
PROMPT = "My order has not arrived yet"


@dataclass
class Setup:
    client: openai.OpenAI
    models: list[str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("moe-gateway")
    base_dir = build_family("qwen2_moe", root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # migrate the schema once
    registry = Registry(tracking_uri=uri, audit=AuditLog(f"sqlite:///{root / 'control.db'}"))
    names = []
    for seed, (kind, targets) in enumerate(MOE_TARGETS.items(), 1):
        name = f"ft-moe-{kind}"
        folder = build_lora(base_dir, root / name, targets, seed=seed)
        tags = {lineage.ADAPTER: "lora", lineage.BASE_MODEL: str(base_dir)}
        version = registry.create_version(name, source=str(folder), run_id=None, tags=tags).version
        registry.move_alias(name, "production", version, actor="test", reason="fine-tune ready")
        names.append(name)
    spec = ServeSpec(auth=False, device="cpu", max_new_tokens=16, batch_window_ms=20, max_batch_size=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGELINE_HOME", str(root / "home"))
        app = build_gateway(registry, [], spec, bases=[BaseSource(BASE, str(base_dir))])
        base_url, stop = serve_in_background(app)
        try:
            client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
            yield Setup(client, [BASE, *names, f"{BASE}:{names[0]}"])
        finally:
            stop()
            registry.close()


def _ask(client: openai.OpenAI, i: int, model: str) -> tuple[str, str, str]:
    """One request; (model, kind, text), or (model, kind, 'HTTP <status>: <message>') on an API error."""
    kind = "chat" if i % 2 else "completion"
    try:
        if kind == "chat":
            chat = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=0
            )
            return model, kind, chat.choices[0].message.content or ""
        done = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
        return model, kind, done.choices[0].text
    except openai.APIStatusError as err:
        return model, kind, f"HTTP {err.status_code}: {err.message}"


def test_100_mixed_requests_on_an_moe_base_with_adapters_answer_without_a_500(setup: Setup) -> None:
    plan = [setup.models[i % len(setup.models)] for i in range(REQUESTS)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda im: _ask(setup.client, *im), enumerate(plan)))
    failures = [r for r in results if r[2].startswith("HTTP ")]
    assert failures == [], Counter(f[2][:120] for f in failures)
    # Greedy decoding: every request of one model and kind says the same, whatever it was batched with.
    answers: dict[tuple[str, str], set[str]] = {}
    for model, kind, text in results:
        answers.setdefault((model, kind), set()).add(text)
    assert all(len(texts) == 1 for texts in answers.values()), answers
    completions = {model: next(iter(t)) for (model, kind), t in answers.items() if kind == "completion"}
    assert len(set(completions.values())) >= len(setup.models) - 1, "each adapter must steer the base"
    assert completions[setup.models[1]] == completions[setup.models[-1]]  # by name == base:name
