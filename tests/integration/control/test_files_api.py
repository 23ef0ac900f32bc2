"""OpenAI's Files API on a real control plane (uvicorn on loopback), driven by the real
``openai`` SDK with real API keys: upload, list, retrieve, content, delete, org isolation,
roles, bad files and the size limit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from forgeline.control import create_control_app
from forgeline.finetune.files import FileStore
from registry.client import Registry
from registry.keys import KeyStore
from serving.gateway.server import serve_in_background
from tests.support.backends import sqlite_backend

pytestmark = pytest.mark.integration

MAX_BYTES = 4096
ROW = {
    "messages": [{"role": "user", "content": "Reset my password?"}, {"role": "assistant", "content": "Go to Settings."}]
}


@dataclass
class Plane:
    url: str
    store: FileStore
    secrets: dict[str, str]

    def client(self, who: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.secrets[who], max_retries=0, timeout=60)


@pytest.fixture
def plane(migrated_mlflow_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Plane]:
    # SQLite only: the files table is plain SQLAlchemy like the keys table, tested on PostgreSQL there.
    for name, value in sqlite_backend(tmp_path / "home", migrated_mlflow_db).env.items():
        monkeypatch.setenv(name, value)
    registry, keys = Registry(), KeyStore()
    store = FileStore(max_bytes=MAX_BYTES)
    secrets = {
        "tess": keys.create("tess", roles=("trainer",), org="acme")[0],
        "uma": keys.create("uma", roles=("user",), org="acme")[0],
        "root": keys.create("root", roles=("admin",), org="acme")[0],
        "rival": keys.create("rival", roles=("trainer",), org="rival")[0],
    }
    url, stop = serve_in_background(create_control_app(registry=registry, keys=keys, files=store))
    try:
        yield Plane(url, store, secrets)
    finally:
        stop()
        registry.close()
        keys.dispose()
        store.dispose()


def jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_upload_list_retrieve_content_delete(plane: Plane, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "train.jsonl", [ROW, ROW, ROW])
    tess = plane.client("tess")
    with data.open("rb") as fh:
        created = tess.files.create(file=fh, purpose="fine-tune")
    assert created.id.startswith("file-")
    assert (created.filename, created.purpose, created.status) == ("train.jsonl", "fine-tune", "processed")
    assert created.bytes == data.stat().st_size

    reader = plane.client("uma")  # any key of the org may read
    assert reader.files.retrieve(created.id) == created
    assert [f.id for f in reader.files.list()] == [created.id]
    assert reader.files.content(created.id).content == data.read_bytes()

    with data.open("rb") as fh:
        second = plane.client("root").files.create(file=("copy.jsonl", fh), purpose="fine-tune")  # admin may upload
    page = tess.files.list(limit=1)
    assert [f.id for f in page.data] == [second.id] and page.has_more
    assert [f.id for f in tess.files.list(limit=1, order="asc")]  # follows the cursor == [created.id, second.id]

    deleted = tess.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    with pytest.raises(openai.NotFoundError):
        tess.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        tess.files.content(created.id)
    assert reader.files.content(second.id).content == data.read_bytes()  # shared content survives


def test_bad_file_names_its_lines(plane: Plane, tmp_path: Path) -> None:
    bad = jsonl(tmp_path / "bad.jsonl", [ROW, ROW, "{oops", {"text": "plain"}])
    with bad.open("rb") as fh, pytest.raises(openai.BadRequestError) as info:
        plane.client("tess").files.create(file=fh, purpose="fine-tune")
    message = info.value.body["message"]  # type: ignore[index]
    assert "'bad.jsonl' has 2 problem(s)" in message
    assert "line 3: not valid JSON" in message and "line 4: no `messages`" in message
    assert info.value.body["param"] == "file"  # type: ignore[index]
    assert plane.client("tess").files.list().data == []


def test_wrong_purpose_is_refused(plane: Plane, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "train.jsonl", [ROW])
    with data.open("rb") as fh, pytest.raises(openai.BadRequestError, match="'batch'") as info:
        plane.client("tess").files.create(file=fh, purpose="batch")
    assert info.value.body["param"] == "purpose"  # type: ignore[index]


def test_another_org_cannot_see_the_file(plane: Plane, tmp_path: Path) -> None:
    with jsonl(tmp_path / "train.jsonl", [ROW]).open("rb") as fh:
        created = plane.client("tess").files.create(file=fh, purpose="fine-tune")
    rival = plane.client("rival")
    for call in (rival.files.retrieve, rival.files.content, rival.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(created.id)
    assert rival.files.list().data == []
    assert plane.client("tess").files.retrieve(created.id).id == created.id  # untouched


def test_user_role_cannot_upload_or_delete(plane: Plane, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "train.jsonl", [ROW])
    with data.open("rb") as fh, pytest.raises(openai.PermissionDeniedError, match="trainer"):
        plane.client("uma").files.create(file=fh, purpose="fine-tune")
    with data.open("rb") as fh:
        created = plane.client("tess").files.create(file=fh, purpose="fine-tune")
    with pytest.raises(openai.PermissionDeniedError):
        plane.client("uma").files.delete(created.id)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=plane.url + "/v1", api_key="fl-wrong-key-000000", max_retries=0).files.list()


def test_oversize_upload_is_refused_with_the_limit(plane: Plane, tmp_path: Path) -> None:
    big = jsonl(tmp_path / "big.jsonl", [ROW] * 200)
    assert big.stat().st_size > MAX_BYTES
    with big.open("rb") as fh, pytest.raises(openai.APIStatusError) as info:
        plane.client("tess").files.create(file=fh, purpose="fine-tune")
    assert info.value.status_code == 413
    assert f"limit of {MAX_BYTES} bytes" in info.value.message
    assert plane.client("tess").files.list().data == []
    assert not any(p.is_file() for p in (plane.store.root / "sha256").rglob("*"))


def test_a_declared_oversize_body_is_refused_before_it_is_read(plane: Plane, tmp_path: Path) -> None:
    from forgeline.control.limits import MULTIPART_SLACK

    big = jsonl(tmp_path / "huge.jsonl", [ROW] * ((MAX_BYTES + MULTIPART_SLACK) // len(json.dumps(ROW)) + 10))
    with big.open("rb") as fh, pytest.raises(openai.APIStatusError) as info:
        plane.client("tess").files.create(file=fh, purpose="fine-tune")
    assert info.value.status_code == 413 and info.value.code == "payload_too_large"
    # Answered from the declared Content-Length (the multipart body, a little over the file's size).
    assert "- upload of " in info.value.message and f"over the limit of {MAX_BYTES} bytes" in info.value.message
