"""``MergeSettings`` is the one description of a merge: built and checked once, it round-trips
through the catalog's version record (only the fields its method uses are recorded) and through
a Ray payload (what shard actors receive) unchanged."""

from __future__ import annotations

import dataclasses
import re

import pytest

from ray_helpers import ray_env  # noqa: F401  (fixture)

from mmer_dist.merge.passes import MergeJob
from mmer_dist.method.settings import SETTINGS, MergeSettings
from mmer_dist.store.catalog import Catalog, VersionRecord, read_catalog, write_catalog

CASES = [
    MergeSettings(lams=(1.0, 0.5)),
    MergeSettings("ties", 0.6, "per-tensor", 1.3, "mmer-no-sign", (0.9, 1.2), dare_rate=0.2, dare_seed=7),
    MergeSettings("ta", alpha=0.5, mask_rule="tall", lams=(1.0, 2.0)),
    MergeSettings("naive", lams=(1.0, 1.0)),
    MergeSettings("neuro", 0.7, neuro_energy=0.9, neuro_keep_parallel=True, lams=(1.0, 0.8)),
]


def _record(settings: MergeSettings, version: int) -> VersionRecord:
    return VersionRecord(version=version, created_at="now", **settings.record(), models=["a", "b"],
                         mask_density=[0.5, 0.5], tau_star_density=0.9, backend="local", passes=["FinalPass"],
                         seconds=1.0, details="{}")


def test_settings_round_trip_through_the_catalog(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    catalog = Catalog(versions=tuple(_record(s, i + 1) for i, s in enumerate(CASES)))
    write_catalog(fs, str(tmp_path), catalog, 0)
    back = read_catalog(fs, str(tmp_path)).versions
    for want, record in zip(CASES, back):
        assert MergeSettings.from_record(record) == want
        for name in SETTINGS:  # a field the method does not use is null, never an unused default
            assert (getattr(record, name) is None) == (not want.applies(name)), (want.method, name)


def test_only_the_fields_a_method_uses_are_accepted_as_options():
    assert MergeSettings.from_options(method="ta", alpha=0.5) == MergeSettings("ta", alpha=0.5)
    with pytest.raises(ValueError, match=re.escape("--topk apply to --merge neuro|ties only")):
        MergeSettings.from_options(method="ta", topk=0.3)
    with pytest.raises(ValueError, match="--dare-seed goes with --dare-rate"):
        MergeSettings.from_options(dare_seed=3)
    with pytest.raises(ValueError, match="--neuro-energy"):
        MergeSettings.from_options(neuro_energy=0.5)
    assert MergeSettings.from_options(method="neuro", neuro_energy=0.5).neuro_energy == 0.5


def test_version_records_carry_every_setting():
    fields = {f.name for f in dataclasses.fields(VersionRecord)}
    assert {f.name for f in dataclasses.fields(MergeSettings)} <= fields


@pytest.mark.slow
def test_settings_round_trip_through_a_ray_payload(ray_env):
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote
        def echo(job: MergeJob) -> MergeJob:
            return job

        jobs = [MergeJob("file:///s", ("a", "b"), s, 3, "fp", compile=True, kernel_cache="/k") for s in CASES]
        assert ray.get([echo.remote(j) for j in jobs]) == jobs
    finally:
        ray.shutdown()
