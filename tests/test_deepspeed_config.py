"""The ds_config "ntl" section: defaults, conversion to NTLConfig, errors naming the key."""
import json

import pytest

from ntl_deepspeed import NTLConfig
from ntl_deepspeed.integrations.deepspeed import split_config


def test_absent_section_disables_ntl():
    assert split_config({"train_batch_size": 8})[1].enabled is False


def test_defaults_and_conversion():
    section = split_config({"ntl": {}})[1]
    assert (section.weight, section.kind, section.mode, section.fused_head) == (0.3, "was",
                                                                                "digits", False)
    cfg = split_config({"ntl": {"kind": "mse", "weight": 0.5, "reweigh": True,
                                "normalization": "global", "ignore_index": -1}})[1]
    assert cfg == NTLConfig(kind="mse", weight=0.5, reweigh=True, normalization="global",
                            ignore_index=-1)


def test_split_removes_only_the_ntl_section():
    ds, section = split_config({"zero_optimization": {"stage": 3}, "ntl": {"weight": 0.1}})
    assert ds == {"zero_optimization": {"stage": 3}} and section.weight == 0.1


@pytest.mark.parametrize("section,message", [
    ({"fused_head": "maybe"}, "ntl.fused_head"),
    ({"normalization": "batch"}, "ntl.normalization"),
    ({"weight": float("nan")}, "ntl.weight"),
    ({"weight": "0.3"}, "ntl.weight: expected a number"),
    ({"log_metrics": "often"}, "ntl.log_metrics"),
    ({"squash_factor": float("inf")}, "ntl.squash_factor"),
])
def test_more_bad_values_name_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        split_config({"ntl": section})


def test_section_must_be_an_object():
    with pytest.raises(ValueError, match='"ntl" must be an object'):
        split_config({"ntl": [0.3]})


def test_json_errors_name_the_file(tmp_path):
    broken = tmp_path / "ds.json"
    broken.write_text('{"ntl": {"weight": 0.3,}}')
    with pytest.raises(ValueError, match=f"{broken}: not valid JSON"):
        split_config(str(broken))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ntl": {"kind": "rmse"}}))
    with pytest.raises(ValueError, match=f'invalid "ntl" section of {bad}: ntl.kind'):
        split_config(str(bad))


def test_fused_head_keys():
    section = split_config({"ntl": {"fused_head": True, "fused_block_size": 256}})[1]
    assert (section.fused_head, section.fused_block_size) == (True, 256)
    with pytest.raises(ValueError, match="ntl.fused_block_size"):
        split_config({"ntl": {"fused_block_size": 0}})


def test_vocab_parallel_head_is_feature_detected(monkeypatch):
    import deepspeed

    from ntl_deepspeed.integrations import deepspeed as adapter

    tp = {"tensor_parallel": {"autotp_size": 2, "vocab_parallel_lm_head": True}}
    assert adapter.has_vocab_parallel_head()  # the installed, pinned 0.19.8
    adapter.check_deepspeed_for_autotp(tp)
    monkeypatch.setattr(adapter, "has_vocab_parallel_head", lambda: False)
    monkeypatch.setattr(deepspeed, "__version__", "0.16.4")
    with pytest.raises(RuntimeError, match=r"VocabParallelLinear .*installed: 0\.16\.4"):
        adapter.check_deepspeed_for_autotp(tp)
    adapter.check_deepspeed_for_autotp({"zero_optimization": {"stage": 3}})  # no AutoTP: any
