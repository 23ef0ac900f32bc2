"""A fine-tuning job never adds versions to another owner's model, even when two orgs' names meet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forgeline.finetune.jobs import FineTuningStore
from forgeline.finetune.service import FineTuning
from forgeline.finetune.translate import registered_name
from registry import lineage
from registry.client import Registry
from registry.errors import ConflictError
from tests.conftest import REPO
from tests.unit.forgeline.finetune.test_jobs_store import new_job


@pytest.fixture
def service(tmp_path: Path) -> Iterator[FineTuning]:
    store = FineTuningStore(f"sqlite:///{tmp_path / 'control.db'}")
    registry = Registry()
    unused: Any = None
    yield FineTuning(store=store, files=unused, bases=unused, launches=unused, registry=registry,
                     policies=unused, settings=unused)
    registry.close()
    store.dispose()


def test_two_orgs_whose_names_meet_do_not_share_a_model(service: FineTuning) -> None:
    # org `acme` with suffix `tiny-s` and org `acme-tiny` with suffix `s` both name ft-acme-tiny-tiny-s.
    name = registered_name("acme-tiny", "tiny", "s", "ftjob-1")
    assert name == registered_name("acme", "tiny", "tiny-s", "ftjob-2")
    job = new_job("acme-tiny")
    service.store.create(job.__class__(**{**job.__dict__, "registered_name": name}))
    service._check_name_free(name, "acme-tiny")  # its own org may add versions
    with pytest.raises(ConflictError, match=r"'ft-acme-tiny-tiny-s' is already used by another owner.*suffix") as refused:
        service._check_name_free(name, "acme")
    assert refused.value.param == "suffix"


def test_a_registered_model_tagged_with_another_org_is_refused(service: FineTuning) -> None:
    source = str(REPO / "assets" / "tiny-base")
    service.registry.create_version("ft-zeta-tiny-x", source=source, run_id=None, tags={lineage.ORG: "zeta"})
    service.registry.create_version("ft-acme-tiny-y", source=source, run_id=None, tags={})  # not yet tagged
    with pytest.raises(ConflictError):
        service._check_name_free("ft-zeta-tiny-x", "acme")
    service._check_name_free("ft-zeta-tiny-x", "zeta")
    service._check_name_free("ft-acme-tiny-y", "acme")  # untagged: training registered it, the tag follows
    service._check_name_free("ft-acme-tiny-new", "acme")  # no model yet
