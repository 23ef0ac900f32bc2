"""Inputs that used to make the control plane answer 500 now get a 400 that names the field,
the value and the fix (in-process over ASGI, a real SQLite registry, a real admin key)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from forgeline.control import create_control_app
from registry.client import Registry
from registry.errors import ModelNotFoundError, NotFoundError
from registry.keys import KeyStore

SURROGATE = '"\\ud800"'  # a JSON escape of an unpaired UTF-16 surrogate


@dataclass
class Plane:
    app: Any
    registry: Registry
    secret: str

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://control") as client:
                headers = {"Authorization": f"Bearer {self.secret}", **kwargs.pop("headers", {})}
                return await client.request(method, path, headers=headers, **kwargs)

        return asyncio.run(go())

    def post_json(self, path: str, raw: str) -> httpx.Response:
        return self.call("POST", path, content=raw.encode(), headers={"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    home = tmp_path_factory.mktemp("control-inputs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FORGELINE_HOME", str(home))
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FORGELINE_DB_URL"):
            patch.delenv(var, raising=False)
        registry = Registry()
        keys = KeyStore()
        source = home / "weights"
        source.mkdir()
        registry.create_version("m", source=str(source), run_id=None, tags={})
        secret = keys.create("root", roles=("admin",))[0]
        yield Plane(create_control_app(registry=registry, keys=keys, supervise=False), registry, secret)
        registry.close()
        keys.dispose()


def _error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


@pytest.mark.parametrize("version", ["%C2%B2", "%D9%A1", "99999999999999999999999", "0"])
def test_version_paths_take_ascii_numbers_in_range_only(plane: Plane, version: str) -> None:
    # "²" used to raise in int(); "١" was read as version 1; a huge one leaked SQLite's message.
    error = _error(plane.call("GET", f"/v1/models/m/versions/{version}"))
    assert error["param"] == "path.version" and "SQLite" not in error["message"]
    assert plane.call("GET", "/v1/models/m/versions/1").status_code == 200


def test_registry_never_sends_an_out_of_range_version_to_the_store(plane: Plane) -> None:
    with pytest.raises(NotFoundError, match="has no version"):
        plane.registry.get_version("m", 2**70)
    for ref in ("m@١", "m@²", "m@99999999999999999999999"):
        with pytest.raises(ModelNotFoundError):
            plane.registry.resolve(ref)  # an unknown alias, never version 1 nor a crash


@pytest.mark.parametrize("alias", ["0", "%C3%B8", "a%20b"])
def test_bad_aliases_in_rollback_and_gates_are_400(plane: Plane, alias: str) -> None:
    rollback = _error(plane.post_json(f"/v1/models/m/aliases/{alias}/rollback", "{}"))
    assert rollback["param"] == "path.alias" and "fix:" in rollback["message"]
    gates = _error(plane.call("GET", f"/v1/models/m/versions/1/gates?alias={alias}"))
    assert gates["param"] == "query.alias"


@pytest.mark.parametrize(
    ("path", "raw", "field"),
    [
        ("/v1/models/m/versions/1/promote", '{"alias": "staging", "reason": ' + SURROGATE + "}", "reason"),
        ("/v1/models/m/versions/1/approvals", '{"decision": "approve", "comment": ' + SURROGATE + "}", "comment"),
        ("/v1/models/m/aliases/production/rollback", '{"reason": ' + SURROGATE + "}", "reason"),
        ("/v1/fine_tuning/jobs", '{"model": "x", "training_file": "f", "metadata": {"k": ' + SURROGATE + "}}", "metadata.k"),
        ("/v1/fine_tuning/jobs", '{"model": ' + SURROGATE + ', "training_file": "f"}', "model"),
    ],
)
def test_unpaired_surrogates_in_json_bodies_are_400_naming_the_field(plane: Plane, path: str, raw: str, field: str) -> None:
    error = _error(plane.post_json(path, raw))
    assert error["param"] == field
    assert "unpaired UTF-16 surrogate \\ud800" in error["message"] and "fix:" in error["message"]


def test_surrogates_in_the_metadata_query_filter_are_400(plane: Plane) -> None:
    query = json.dumps({"team": "\ud800"})  # json.dumps escapes it as \ud800
    error = _error(plane.call("GET", "/v1/fine_tuning/jobs", params={"metadata": query}))
    assert error["param"] == "metadata.team"


def test_deeply_nested_json_bodies_and_upload_lines_are_400(plane: Plane) -> None:
    deep = "[" * 50_000 + "]" * 50_000
    body = _error(plane.post_json("/v1/models/m/versions/1/promote", deep))
    assert "nested more than" in body["message"]
    row = '{"messages": ' + "[" * 5_000 + "]" * 5_000 + "}\n"
    surrogate_row = '{"messages": [{"role": "user", "content": ' + SURROGATE + '}, {"role": "assistant", "content": "x"}]}\n'
    for content, expected in ((row, "nested more than"), (surrogate_row, "messages[0].content: contains an unpaired")):
        upload = plane.call("POST", "/v1/files", files={"file": ("data.jsonl", content.encode())}, data={"purpose": "fine-tune"})
        error = _error(upload)
        assert "line 1" in error["message"] and expected in error["message"]


def test_the_openapi_spec_documents_400_not_422_and_the_error_statuses(plane: Plane) -> None:
    spec = plane.call("GET", "/openapi.json").json()
    promote = spec["paths"]["/v1/models/{name}/versions/{version}/promote"]["post"]["responses"]
    assert "422" not in promote and {"400", "401", "403", "404", "409"} <= set(promote)
    assert promote["400"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
    version = spec["paths"]["/v1/models/{name}/versions/{version}"]["get"]["parameters"]
    bounds = next(p["schema"] for p in version if p["name"] == "version")
    assert bounds["minimum"] == 1 and bounds["maximum"] == 2**63 - 1
    assert not any("422" in op["responses"] for ops in spec["paths"].values() for op in ops.values())


def test_json_bodies_over_the_limit_are_413(plane: Plane) -> None:
    big = '{"reason": "' + "x" * (2 * 1024 * 1024) + '"}'
    error = _error(plane.post_json("/v1/models/m/versions/1/promote", big), 413)
    assert error["code"] == "payload_too_large"
