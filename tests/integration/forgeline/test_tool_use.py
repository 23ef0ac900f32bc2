"""Done means (issue 17): the tiny base fine-tuned on the generated tool-use task calls the right tool.

recipes/tiny/sft-tools.yaml (shortened) → `forgeline evaluate` records ``tool_call_accuracy``
and ``schema_valid_rate`` for the version and its base → the version passes
recipes/policies/tools.yaml → built and served, it answers the stock ``openai`` SDK with a
correct ``tool_calls`` entry (unary and streamed), and goes on after the ``tool`` result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from tests.integration.forgeline.test_quickstart import REPO, forgeline

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "tiny-sft-tools"
STEPS = int(os.environ.get("FORGELINE_TOOL_TEST_STEPS", "40"))
TOOLS = json.loads((REPO / "recipes" / "data" / "tool-use" / "eval.jsonl").read_text().splitlines()[0])["tools"]


def _recipe(tmp: Path) -> Path:
    src = REPO / "recipes" / "tiny" / "sft-tools.yaml"
    raw = yaml.safe_load(src.read_text())
    raw["model"]["base"] = str((src.parent / raw["model"]["base"]).resolve())
    raw["model"]["chat_template"] = str((src.parent / raw["model"]["chat_template"]).resolve())
    raw["data"] = {k: str((src.parent / v).resolve()) for k, v in raw["data"].items()}
    raw["train"].update(max_steps=STEPS, save_steps=STEPS)
    raw["evaluate"].update(max_samples=30)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("tool-use")
    home = tmp / "home"
    for args in (("train", str(_recipe(tmp))), ("evaluate", NAME, "1")):
        result = forgeline(home, *args)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    previous = os.environ.get("FORGELINE_HOME")
    os.environ["FORGELINE_HOME"] = str(home)
    try:
        yield home
    finally:
        if previous is None:
            os.environ.pop("FORGELINE_HOME", None)
        else:
            os.environ["FORGELINE_HOME"] = previous


def test_tool_call_accuracy_beats_the_base_and_passes_the_policy(home: Path) -> None:
    from registry.client import Registry

    info = Registry().get_version(NAME, 1)
    metrics, base = info.metrics(), info.base_metrics()
    print(f"\ntool use after {STEPS} steps: {metrics}\nbase: {base}")
    assert metrics["tool_call_accuracy"] > base["tool_call_accuracy"]
    assert metrics["schema_valid_rate"] >= 0.8
    promoted = forgeline(home, "promote", NAME, "1", "--to", "production", "--policy",
                         str(REPO / "recipes" / "policies" / "tools.yaml"), "--local-admin", "ops")
    assert promoted.returncode == 0, promoted.stdout[-2000:] + promoted.stderr[-2000:]
    built = forgeline(home, "build", f"{NAME}@production")
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]


@pytest.fixture
def client(home: Path) -> Iterator[openai.OpenAI]:
    from registry.client import Registry
    from serving.config import ServeSpec
    from serving.gateway.app import create_app
    from serving.gateway.server import serve_in_background
    from serving.registry_models import registry_catalog

    catalog = registry_catalog(Registry(), [f"{NAME}@production"], spec=ServeSpec(port=0))
    base_url, stop = serve_in_background(create_app(catalog))
    try:
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="test", max_retries=0, timeout=120)
    finally:
        stop()


def test_the_served_model_calls_the_tool_and_goes_on_after_its_result(
    client: openai.OpenAI, home: Path
) -> None:
    ask = [{"role": "user", "content": "Where is my order 28589?"}]
    reply = client.chat.completions.create(model=NAME, messages=ask, tools=TOOLS, temperature=0, max_tokens=48)  # type: ignore[arg-type]
    choice = reply.choices[0]
    print(f"\nunary: {choice.message}")
    assert choice.finish_reason == "tool_calls"
    call = (choice.message.tool_calls or [])[0]
    assert call.function.name == "lookup_order"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"order_id": "28589"}  # type: ignore[union-attr]

    stream = client.chat.completions.create(model=NAME, messages=ask, tools=TOOLS, temperature=0, max_tokens=48, stream=True)  # type: ignore[arg-type]
    deltas, finish = [], None
    for event in stream:
        for c in event.choices:
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert deltas[0].function.name == "lookup_order" and deltas[0].id  # type: ignore[union-attr]
    assert json.loads("".join(d.function.arguments or "" for d in deltas if d.function)) == {"order_id": "28589"}

    follow = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"order_id": "28589", "status": "shipped"})},
    ]
    answer = client.chat.completions.create(model=NAME, messages=follow, tools=TOOLS, temperature=0, max_tokens=48)  # type: ignore[arg-type]
    print(f"after the tool: {answer.choices[0].message}")
    assert answer.choices[0].finish_reason == "stop"
    assert not answer.choices[0].message.tool_calls
    assert "28589" in (answer.choices[0].message.content or "")
