"""The `slora` section of additional_config: parsing, and errors that name the problem."""

import pytest

from vllm_slora.config import SLoRAConfig, SLoRAConfigError


def test_absent_key_means_disabled():
    assert SLoRAConfig.from_additional_config(None) is None
    assert SLoRAConfig.from_additional_config({}) is None
    assert SLoRAConfig.from_additional_config({"other_plugin": {}}) is None


def test_empty_section_gives_defaults():
    assert SLoRAConfig.from_additional_config({"slora": {}}) == SLoRAConfig()
    assert SLoRAConfig.from_additional_config({"slora": None}) == SLoRAConfig()


def test_values_are_taken():
    cfg = SLoRAConfig.from_dict({"host_cache_mb": 64, "kernel_backend": "torch", "allow_pickle_adapters": True})
    assert (cfg.host_cache_mb, cfg.kernel_backend, cfg.allow_pickle_adapters) == (64, "torch", True)


@pytest.mark.parametrize(
    "raw, needles",
    [
        ({"host_cache": 1}, ["unknown slora config key 'host_cache'", "host_cache_mb", "kernel_backend"]),
        ({"host_cache_mb": "big"}, ["'host_cache_mb'", "int", "'big'"]),
        ({"host_cache_mb": True}, ["'host_cache_mb'", "int"]),
        ({"allow_pickle_adapters": 1}, ["'allow_pickle_adapters'", "bool"]),
        ({"host_cache_mb": 0}, ["'host_cache_mb'", "positive"]),
        ({"prefetch_depth": -1}, ["'prefetch_depth'", ">= 0"]),
        ({"kernel_backend": "cuda"}, ["'kernel_backend'", "auto, native, torch, triton", "'cuda'"]),
        ([1, 2], ["must be a JSON object"]),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(raw, needles):
    with pytest.raises(SLoRAConfigError) as err:
        SLoRAConfig.from_dict(raw)
    for needle in needles:
        assert needle in str(err.value)
