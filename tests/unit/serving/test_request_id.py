"""Request ids: the client's when sane, else a fresh random UUID (version 4) in hex."""

from __future__ import annotations

import uuid

from serving import request_id


def test_a_new_id_is_a_version_4_uuid_in_hex_and_never_repeats() -> None:
    ids = [request_id.from_header(None) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for made in ids:
        parsed = uuid.UUID(made)
        assert parsed.hex == made and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_the_clients_id_is_kept_when_sane_and_replaced_otherwise() -> None:
    assert request_id.from_header("req-42:abc") == "req-42:abc"
    for bad in ("", "has space", "x" * 129, "new\nline"):
        replaced = request_id.from_header(bad)
        assert replaced != bad and uuid.UUID(replaced).version == 4
