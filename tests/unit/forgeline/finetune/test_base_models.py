"""BaseModelStore on SQLite: operator-configured base models, validated defaults, conflicts."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from forgeline.finetune.base_models import BaseModelRecord, BaseModelStore
from registry.errors import ConflictError, ErrorCode, ForgelineError, NotFoundError
from tests.conftest import TINY_BASE
from training.config import AdapterSpec, ModelSpec, TrainSpec

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "control.db"


@pytest.fixture
def store(db: Path) -> Iterator[BaseModelStore]:
    bases = BaseModelStore(f"sqlite:///{db}")
    yield bases
    bases.dispose()


def invalid(store: BaseModelStore, **kwargs: object) -> ForgelineError:
    args = {"name": "tiny", "source": str(TINY_BASE), "actor": "ops"} | kwargs
    with pytest.raises(ForgelineError) as info:
        store.add(**args)  # type: ignore[arg-type]
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert "fix:" in str(info.value) and "\n" not in str(info.value)
    return info.value


def test_add_get_list_remove_round_trip(store: BaseModelStore, db: Path) -> None:
    added = store.add(
        "tiny",
        str(TINY_BASE),
        actor="ops-olga",
        chat_template=TEMPLATE,
        description="2-layer test model",
        adapter={"kind": "lora", "r": 8},
        train={"max_length": 256, "learning_rate": 1e-4},
    )
    store.add("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", actor="ops-olga")

    got = store.get("tiny")
    assert got == added
    assert (got.source, got.chat_template, got.description) == (str(TINY_BASE), TEMPLATE, "2-layer test model")
    assert got.adapter == {"kind": "lora", "r": 8} and got.train == {"max_length": 256, "learning_rate": 1e-4}
    assert got.added_by == "ops-olga" and got.added_at.tzinfo is not None
    assert [r.name for r in store.list()] == ["qwen2.5-7b-instruct", "tiny"]
    assert store.get("qwen2.5-7b-instruct").source == "Qwen/Qwen2.5-7B-Instruct"

    # A second store on the same database (another process) sees the same rows.
    other = BaseModelStore(f"sqlite:///{db}")
    assert other.get("tiny") == added
    other.dispose()
    assert sqlite3.connect(db).execute("select count(*) from base_models").fetchone() == (2,)

    removed = store.remove("tiny")
    assert removed.name == "tiny"
    assert [r.name for r in store.list()] == ["qwen2.5-7b-instruct"]
    with pytest.raises(NotFoundError):
        store.remove("tiny")


def test_get_unknown_names_the_known_models_and_the_fix(store: BaseModelStore) -> None:
    with pytest.raises(NotFoundError) as info:
        store.get("llama-9")
    assert "none yet" in str(info.value)
    store.add("tiny", str(TINY_BASE), actor="ops")
    store.add("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", actor="ops")
    with pytest.raises(NotFoundError) as info:
        store.get("llama-9")
    message = str(info.value)
    assert info.value.param == "model" and info.value.http_status == 404
    assert "qwen2.5-7b-instruct, tiny" in message and "forgeline models add-base llama-9 SOURCE" in message


def test_model_spec_and_openai_object(store: BaseModelStore) -> None:
    record = store.add("tiny", str(TINY_BASE), actor="ops", chat_template=TEMPLATE)
    spec = record.model_spec()
    assert isinstance(spec, ModelSpec)
    assert spec.base == str(TINY_BASE.resolve()) and Path(spec.base).is_absolute()
    assert spec.chat_template == TEMPLATE
    assert store.get("tiny").model_spec() == spec
    assert store.get("tiny").to_openai() == {
        "id": "tiny",
        "object": "model",
        "created": int(record.added_at.timestamp()),
        "owned_by": "forgeline",
    }
    assert store.add("hub", "Qwen/Qwen2.5-0.5B", actor="ops").model_spec().chat_template is None


def test_relative_and_home_paths_are_stored_absolute(
    store: BaseModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "models" / "my-base"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "models")
    assert store.add("rel", "./my-base", actor="ops").source == str(folder.resolve())
    assert store.add("bare", "my-base", actor="ops").source == str(folder.resolve())  # exists, so a path
    monkeypatch.setenv("HOME", str(tmp_path))
    assert store.add("home", "~/models/my-base", actor="ops").source == str(folder.resolve())
    assert store.get("rel").model_spec().base == str(folder.resolve())


@pytest.mark.parametrize("name", ["Qwen", "qwen:lora", "qwen@prod", "-x", "", "a" * 65, "qwen 7b", "q/w"])
def test_bad_names_are_refused(store: BaseModelStore, name: str) -> None:
    error = invalid(store, name=name)
    assert error.param == "name" and str(error).startswith("name: invalid value")
    assert store.list() == []


def test_bad_sources_are_refused(store: BaseModelStore, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    config_file = TINY_BASE / "config.json"
    for source, hint in [
        (str(empty), "no config.json"),
        (str(config_file), "not a folder"),
        ("./missing-folder", "not a folder"),
        ("just-a-name", "owner/name"),
        ("https://huggingface.co/Qwen/Qwen2.5-7B", "owner/name"),
        ("", "hub id"),
    ]:
        error = invalid(store, source=source)
        assert error.param == "source" and str(error).startswith("source:") and hint in str(error), (source, error)
    assert store.list() == []


def test_bad_adapter_and_train_defaults_name_their_field(store: BaseModelStore) -> None:
    error = invalid(store, train={"learning_rate": 5})
    assert error.param == "train.learning_rate" and "train.learning_rate" in str(error) and "5" in str(error)
    error = invalid(store, train={"max_lenght": 2048})
    assert error.param == "train.max_lenght" and "unknown field" in str(error) and "max_length" in str(error)
    error = invalid(store, adapter={"kind": "dora"})
    assert error.param == "adapter.kind" and "'dora'" in str(error)
    error = invalid(store, adapter={"r": 0, "dropout": 2})
    assert "adapter.r" in str(error) and "adapter.dropout" in str(error)
    error = invalid(store, adapter={"r": -1}, train={"learning_rate": 5})  # every problem at once
    assert error.param == "adapter.r" and "train.learning_rate" in str(error)
    error = invalid(store, adapter=["lora"])
    assert error.param == "adapter"
    assert store.list() == []


def test_defaults_are_coerced_and_usable_in_a_recipe(store: BaseModelStore) -> None:
    record = store.add("tiny", str(TINY_BASE), actor="ops", adapter={"r": "8"}, train={"max_length": "1024"})
    assert record.adapter == {"r": 8} and record.train == {"max_length": 1024}
    got = store.get("tiny")
    assert AdapterSpec(**got.adapter).r == 8 and TrainSpec(**got.train).max_length == 1024
    # Only what the operator set is stored; the recipe's own defaults fill the rest.
    assert TrainSpec(**got.train).learning_rate == TrainSpec().learning_rate


def test_bad_chat_template_and_actor(store: BaseModelStore) -> None:
    error = invalid(store, chat_template="{% for m in messages %}no end")
    assert error.param == "chat_template" and "Jinja" in str(error)
    assert invalid(store, chat_template="  ").param == "chat_template"
    # transformers' own tags ({% generation %}, {% break %}) are accepted: the shipped tiny template uses them.
    shipped = (TINY_BASE / "chat_template.jinja").read_text()
    assert store.add("tiny", str(TINY_BASE), actor="ops", chat_template=shipped).chat_template == shipped
    assert invalid(store, actor=" ").param == "actor"


def test_duplicate_needs_replace(store: BaseModelStore) -> None:
    first = store.add("tiny", str(TINY_BASE), actor="ops", train={"max_length": 256})
    with pytest.raises(ConflictError) as info:
        store.add("tiny", "Qwen/Qwen2.5-0.5B", actor="other")
    assert "--replace" in str(info.value) and info.value.http_status == 409
    assert store.get("tiny") == first

    second = store.add("tiny", "Qwen/Qwen2.5-0.5B", actor="other", adapter={"r": 4}, replace=True)
    got = store.get("tiny")
    assert got == second and got.source == "Qwen/Qwen2.5-0.5B" and got.adapter == {"r": 4} and got.train == {}
    assert got.added_by == "other" and len(store.list()) == 1
    # replace=True on a new name simply adds it.
    assert store.add("fresh", "Qwen/Qwen2.5-0.5B", actor="ops", replace=True).name == "fresh"


def test_record_is_a_frozen_value() -> None:
    record = BaseModelRecord(
        name="x",
        source="a/b",
        chat_template=None,
        description="",
        adapter={},
        train={},
        added_by="ops",
        added_at=datetime.now(UTC),
    )
    with pytest.raises(AttributeError):
        record.name = "y"  # type: ignore[misc]
