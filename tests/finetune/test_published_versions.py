"""Which requests follow a job's newest published version (finetune/published_versions.py)."""

from __future__ import annotations

from vllm.lora.request import LoRARequest

from vllm_slora.finetune.published_versions import FIRST_VERSION_ID, PublishedVersions


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_requests_for_the_jobs_versions_follow_the_newest(tmp_path):
    clock = Clock()
    versions = PublishedVersions(clock)
    job_dir = tmp_path / "job"
    first = versions.publish("j", "ft:m:x", str(job_dir), 5, str(job_dir / "step-5"), updated_at=99.5)
    assert first.lora_request.lora_int_id >= FIRST_VERSION_ID and first.servable_at == 100.0
    # The API server's request still names step-0 (its last in-place load): follows step-5.
    api = LoRARequest("ft:m:x", 3, str(job_dir / "step-0"))
    assert versions.newest_for(api) is first
    # The engine's own version request is not rewritten again.
    assert versions.newest_for(first.lora_request) is None
    clock.now = 101.0
    second = versions.publish("j", "ft:m:x", str(job_dir), 10, str(job_dir / "step-10"), updated_at=None)
    assert second.lora_request.lora_int_id != first.lora_request.lora_int_id
    assert versions.newest_for(first.lora_request) is second  # a waiting request of step 5 moves on
    assert versions.newest_for(api) is second and second.updated_at == 101.0
    assert versions.newest("ft:m:x") is second


def test_other_adapters_are_served_as_asked(tmp_path):
    versions = PublishedVersions()
    job_dir = tmp_path / "job"
    versions.publish("j", "ft:m:x", str(job_dir), 5, str(job_dir / "step-5"), updated_at=None)
    assert versions.newest_for(None) is None
    # Another name, or the same name loaded by hand from elsewhere: not the job's.
    assert versions.newest_for(LoRARequest("other", 3, str(job_dir / "step-0"))) is None
    assert versions.newest_for(LoRARequest("ft:m:x", 3, str(tmp_path / "mine"))) is None
    assert versions.newest_for(LoRARequest("ft:m:x", 3, str(job_dir / "batches"))) is None


def test_first_request_is_noted_once(tmp_path):
    clock = Clock()
    versions = PublishedVersions(clock)
    version = versions.publish("j", "a", str(tmp_path), 2, str(tmp_path / "step-2"), updated_at=99.0)
    assert versions.first_request(3) is None  # not an engine-published version
    clock.now = 100.25
    assert versions.first_request(version.lora_request.lora_int_id) is version
    assert version.first_request_at == 100.25
    assert versions.first_request(version.lora_request.lora_int_id) is None
    (described,) = versions.describe()
    assert described["step"] == 2 and described["first_request_at"] - described["updated_at"] == 1.25
