"""The neutral checkpoint file (vdm_common.neutral): exact round trip, consistency checks, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy

from vdm_common.config import ModelConfig
from vdm_common.neutral import (NeutralCheckpoint, NeutralFileError, load_neutral, read_metadata, same_tensors,
                                save_neutral)
from vdm_common.weights import ConversionError

CONFIG = ModelConfig(vocab_size=17, image_channels=1, sm_n_embd=16, sm_n_layer=1, norm_groups=4,
                     compute_dtype="float64")


def _flat(seed, dtype=np.float64):
    rs = np.random.RandomState(seed)
    return {"gamma/w": rs.standard_normal(1).astype(dtype),
            "score_model/conv_in/kernel": rs.standard_normal((3, 3, 1, 16)).astype(dtype)}


def _ckpt(**changes):
    values = dict(model_config=CONFIG, params=_flat(0), step=7, ema_params=_flat(1), opt_mu=_flat(2),
                  opt_nu={k: np.abs(v) for k, v in _flat(3).items()}, opt_count=7,
                  extra={"backend": "test"})
    values.update(changes)
    return NeutralCheckpoint(**values)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_round_trip_is_exact(tmp_path, dtype):
    ckpt = _ckpt(params=_flat(0, dtype), ema_params=None, opt_mu=None, opt_nu=None, opt_count=None)
    back = load_neutral(save_neutral(tmp_path / "sub" / "w.safetensors", ckpt))
    assert same_tensors(back.params, ckpt.params) == []
    assert back.model_config == CONFIG and back.step == 7 and back.ema_params is None and not back.has_optimizer
    full = _ckpt()
    back = load_neutral(save_neutral(tmp_path / "full.safetensors", full))
    for name in ("params", "ema_params", "opt_mu", "opt_nu"):
        assert same_tensors(getattr(back, name), getattr(full, name)) == [], name
    assert (back.step, back.opt_count, back.extra) == (7, 7, {"backend": "test"})
    meta = read_metadata(tmp_path / "full.safetensors")
    assert meta["format"] == "vdm-neutral" and json.loads(meta["model_config"]) == CONFIG.to_dict()


def test_inconsistent_checkpoints_are_refused(tmp_path):
    bad_ema = _flat(1)
    del bad_ema["gamma/w"]
    with pytest.raises(ConversionError, match=r"ema_params .*\n.*missing \(1\):\n    gamma/w"):
        save_neutral(tmp_path / "x.safetensors", _ckpt(ema_params=bad_ema))
    with pytest.raises(ConversionError, match="optimizer state is incomplete"):
        save_neutral(tmp_path / "x.safetensors", _ckpt(opt_count=None))
    with pytest.raises(ConversionError, match="step = -1"):
        save_neutral(tmp_path / "x.safetensors", _ckpt(step=-1))
    assert not (tmp_path / "x.safetensors").exists()


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(NeutralFileError, match=r"nothere.safetensors does not exist"):
        load_neutral(tmp_path / "nothere.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(NeutralFileError, match=r"junk.safetensors is not a safetensors file"):
        load_neutral(tmp_path / "junk.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(NeutralFileError, match=r"short.safetensors is not a safetensors file"):
        load_neutral(tmp_path / "short.safetensors")
    (tmp_path / "plain.safetensors").write_bytes(safetensors.numpy.save({"a": np.zeros(2)}))
    with pytest.raises(NeutralFileError, match=r"plain.safetensors is a safetensors file but not a VDM neutral"):
        load_neutral(tmp_path / "plain.safetensors")
    meta = {"format": "vdm-neutral", "format_version": "1", "model_config": '{"vocab_size": 1}'}
    (tmp_path / "badcfg.safetensors").write_bytes(safetensors.numpy.save({"params/a": np.zeros(2)}, meta))
    with pytest.raises(NeutralFileError, match=r"badcfg.safetensors: invalid model_config.*vocab_size"):
        load_neutral(tmp_path / "badcfg.safetensors")
    meta = dict(meta, model_config=CONFIG.to_json(), format_version="99")
    (tmp_path / "new.safetensors").write_bytes(safetensors.numpy.save({"params/a": np.zeros(2)}, meta))
    with pytest.raises(NeutralFileError, match=r"format version 99"):
        load_neutral(tmp_path / "new.safetensors")
    meta["format_version"] = "1"
    (tmp_path / "odd.safetensors").write_bytes(safetensors.numpy.save({"weights/a": np.zeros(2)}, meta))
    with pytest.raises(NeutralFileError, match=r"outside the known sets.*weights/a"):
        load_neutral(tmp_path / "odd.safetensors")
