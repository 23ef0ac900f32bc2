"""The file store on a real SQLite control database and a real blob folder."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgeline.finetune.files import FileRecord, FileStore, safe_filename
from forgeline.finetune.formats import FileFormatError
from registry.errors import ErrorCode, ForgelineError, NotFoundError

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
DATA = (json.dumps(ROW) + "\n").encode() * 3


class CountingStream(io.BytesIO):
    """An upload that records how much of it was read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.consumed = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.consumed += len(chunk)
        return chunk


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileStore]:
    store = FileStore(root=tmp_path / "blobs")
    yield store
    store.dispose()


def blobs(store: FileStore) -> list[Path]:
    return sorted(p for p in (store.root / "sha256").rglob("*") if p.is_file())


def upload(store: FileStore, data: bytes = DATA, *, org: str = "acme", name: str = "train.jsonl") -> FileRecord:
    return store.create(org=org, actor="ana", filename=name, purpose="fine-tune", stream=io.BytesIO(data))


def test_upload_then_read_back(store: FileStore) -> None:
    record = upload(store)
    assert record.id.startswith("file-") and len(record.id) == len("file-") + 24
    assert (record.bytes, record.rows, record.format, record.created_by) == (len(DATA), 3, "chat", "ana")
    assert store.get("acme", record.id) == record
    assert store.path("acme", record.id).read_bytes() == DATA
    body = record.to_openai()
    assert body["object"] == "file" and body["status"] == "processed" and isinstance(body["created_at"], int)


def test_identical_content_shares_one_blob(store: FileStore) -> None:
    first, second = upload(store), upload(store, name="copy.jsonl")
    assert first.id != second.id and first.sha256 == second.sha256
    assert blobs(store) == [store.path("acme", first.id)]


def test_delete_keeps_a_shared_blob_until_the_last_reference(store: FileStore) -> None:
    first, second = upload(store), upload(store, org="other")
    blob = store.path("acme", first.id)
    store.delete("acme", first.id)
    assert blob.is_file()  # still referenced by the other org's file
    with pytest.raises(NotFoundError):
        store.get("acme", first.id)
    store.delete("other", second.id)
    assert not blob.exists()
    with pytest.raises(NotFoundError):
        store.delete("other", second.id)  # deleting twice


def test_another_orgs_file_reads_as_missing(store: FileStore) -> None:
    record = upload(store, org="acme")
    for call in (store.get, store.path, store.delete):
        with pytest.raises(NotFoundError) as info:
            call("rival", record.id)
        assert info.value.param == "file_id"
        assert "acme" not in info.value.message
    assert store.list("rival") == ([], False)


def test_size_limit_stops_reading_mid_stream_and_leaves_nothing(tmp_path: Path) -> None:
    store = FileStore(root=tmp_path / "blobs", max_bytes=1000)
    stream = CountingStream(DATA * 10_000)  # ~1 MiB per read chunk, several chunks in all
    with pytest.raises(ForgelineError) as info:
        store.create(org="acme", actor="ana", filename="big.jsonl", purpose="fine-tune", stream=stream)
    assert info.value.code == ErrorCode.PAYLOAD_TOO_LARGE and info.value.http_status == 413
    assert "limit of 1000 bytes" in info.value.message and "FORGELINE_MAX_FILE_BYTES" in info.value.message
    assert stream.consumed < len(stream.getvalue())  # it did not read the whole upload
    assert list((store.root / "sha256").iterdir()) == []  # no temp file, no blob
    assert store.list("acme") == ([], False)
    store.dispose()


def test_max_bytes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGELINE_MAX_FILE_BYTES", "10")
    with pytest.raises(ForgelineError, match="limit of 10 bytes"):
        upload(FileStore(root=tmp_path))
    monkeypatch.setenv("FORGELINE_MAX_FILE_BYTES", "lots")
    with pytest.raises(ForgelineError, match="FORGELINE_MAX_FILE_BYTES: invalid value 'lots'"):
        FileStore(root=tmp_path)


def test_invalid_content_leaves_no_blob(store: FileStore) -> None:
    with pytest.raises(FileFormatError, match="line 4: not valid JSON"):
        upload(store, DATA + b"oops\n")
    assert list((store.root / "sha256").iterdir()) == []


def test_unknown_purpose_is_named(store: FileStore) -> None:
    with pytest.raises(ForgelineError) as info:
        store.create(org="acme", actor="ana", filename="x.jsonl", purpose="batch", stream=io.BytesIO(DATA))
    assert info.value.param == "purpose"
    assert "'batch'" in info.value.message and "fine-tune" in info.value.message


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\ana\\train.jsonl", "train.jsonl"),
        ("bad\x00na\nme\x1b.jsonl", "badname.jsonl"),
        ("", "upload.jsonl"),
        ("..", "upload.jsonl"),
        ("dir/", "upload.jsonl"),
        ("x" * 300, "x" * 255),
    ],
)
def test_safe_filename(given: str, kept: str) -> None:
    assert safe_filename(given) == kept


def test_filename_is_metadata_only(store: FileStore) -> None:
    record = upload(store, name="../../escape.jsonl")
    assert record.filename == "escape.jsonl"
    assert store.path("acme", record.id).is_relative_to(store.root)
    assert not (store.root.parent / "escape.jsonl").exists()


def test_list_pages_with_a_cursor_and_filters(store: FileStore) -> None:
    made = [upload(store, DATA * (i + 1), name=f"{i}.jsonl") for i in range(5)]
    page, more = store.list("acme", limit=2)
    assert [r.id for r in page] == [made[4].id, made[3].id] and more
    page, more = store.list("acme", after=page[-1].id, limit=2)
    assert [r.id for r in page] == [made[2].id, made[1].id] and more
    page, more = store.list("acme", after=page[-1].id, limit=2)
    assert [r.id for r in page] == [made[0].id] and not more
    page, more = store.list("acme", order="asc")
    assert [r.id for r in page] == [r.id for r in made] and not more
    assert store.list("acme", purpose="batch") == ([], False)
    store.delete("acme", made[2].id)
    assert made[2].id not in [r.id for r in store.list("acme")[0]]
    with pytest.raises(ForgelineError, match="limit"):
        store.list("acme", limit=0)
    with pytest.raises(NotFoundError):
        store.list("acme", after="file-nope")
