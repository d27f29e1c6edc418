"""Weight and training-state conversion between the backends: bit-exact round trips (params, EMA, optimizer
state, step), strict key checks, the native files and the convert.py CLI."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import convert as convert_cli
from parity_tests import cases, measure
from vdm_common.config import load_config, model_config
from vdm_common.neutral import load_neutral, same_tensors
from vdm_common.types import Noise
from vdm_common.weights import ConversionError
from vdm_jax import convert as jax_convert
from vdm_torch import convert as torch_convert
from vdm_torch import steps as torch_steps

CASE = "endpoints-vm-cont-attn2-c3-v17"   # every kind of parameter (network schedule, endpoints, attention)
QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.py")


def assert_jax_states_identical(a, b):
    """Same tree structure and bit-identical leaves (dtype, shape, bytes) of two JAX TrainStates."""
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), \
            jax.tree_util.keystr(path)


def assert_torch_states_identical(a: torch_steps.TrainState, b: torch_steps.TrainState):
    """Bit-identical model, EMA and per-parameter AdamW state (by name), and the same step."""
    assert a.step == b.step
    for name in ("model", "ema"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{name}.{k}"
    params_b = dict(b.model.named_parameters())
    for name, p in a.model.named_parameters():
        st_a, st_b = a.optimizer.state[p], b.optimizer.state[params_b[name]]
        assert sorted(st_a) == sorted(st_b) == ["exp_avg", "exp_avg_sq", "step"], name
        for k in st_a:
            assert st_a[k].dtype == st_b[k].dtype and torch.equal(st_a[k], st_b[k]), f"{name}: {k}"
    for ga, gb in zip(a.optimizer.param_groups, b.optimizer.param_groups):
        assert {k: v for k, v in ga.items() if k not in ("params", "lr")} == \
            {k: v for k, v in gb.items() if k not in ("params", "lr")}


def _torch_state(case, dtype, steps):
    """A torch TrainState after `steps` real training steps (non-zero moments, non-trivial EMA)."""
    state = torch_convert.state_from_neutral(measure.initial_checkpoint(case, dtype), cases.optimizer_config(),
                                             fresh_optimizer=True)
    return measure.torch_train(state, case, dtype, 0, steps)[0]


@pytest.mark.parametrize("dtype", cases.DTYPES)
def test_round_trip_jax_torch_jax_is_bit_exact(dtype):
    opt, cfg = cases.optimizer_config(), cases.model_config(CASE, dtype)
    state = jax_convert.state_from_neutral(measure.jax_training(CASE, dtype).snapshots[cases.CONTINUE_AT], opt)
    via_torch = torch_convert.state_from_neutral(measure.through_file(jax_convert.state_to_neutral(state, cfg)), opt)
    back = jax_convert.state_from_neutral(measure.through_file(torch_convert.state_to_neutral(via_torch)), opt)
    assert_jax_states_identical(state, back)
    # ... and the round-tripped state trains on bit for bit.
    batch = cases.training_batches(CASE, dtype, cases.CONTINUE_AT + 1)[-1]
    step = measure._jax_train_step(cfg)
    args = (jnp.asarray(batch.images), jnp.asarray(batch.conditioning), Noise(*map(jnp.asarray, batch.noise)))
    assert_jax_states_identical(step(state, *args)[0], step(back, *args)[0])


@pytest.mark.parametrize("dtype", cases.DTYPES)
def test_round_trip_torch_jax_torch_is_bit_exact(dtype):
    opt, cfg = cases.optimizer_config(), cases.model_config(CASE, dtype)
    state = _torch_state(CASE, dtype, 3)
    via_jax = jax_convert.state_from_neutral(measure.through_file(torch_convert.state_to_neutral(state)), opt)
    back = torch_convert.state_from_neutral(measure.through_file(jax_convert.state_to_neutral(via_jax, cfg)), opt)
    assert_torch_states_identical(state, back)
    # ... and the round-tripped state trains on bit for bit.
    measure.torch_train(state, CASE, dtype, 3, 4)
    measure.torch_train(back, CASE, dtype, 3, 4)
    assert_torch_states_identical(state, back)


def test_fresh_torch_optimizer_is_zero_moments():
    """A torch AdamW that has not stepped has no state; it converts as zero moments and count 0, which
    JAX's fresh optax state equals bit for bit."""
    opt = cases.optimizer_config()
    state = torch_convert.state_from_neutral(measure.initial_checkpoint(CASE, "float64"), opt, fresh_optimizer=True)
    ckpt = torch_convert.state_to_neutral(state)
    assert ckpt.opt_count == 0 and all(not v.any() for v in ckpt.opt_mu.values())
    jax_state = jax_convert.state_from_neutral(measure.initial_checkpoint(CASE, "float64"), opt, fresh_optimizer=True)
    fresh = jax_convert.state_to_neutral(jax_state, state.model.config)
    assert same_tensors(fresh.opt_mu, ckpt.opt_mu) == [] and same_tensors(fresh.opt_nu, ckpt.opt_nu) == []


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_conversion_is_strict(backend):
    """A missing, an unexpected and a mis-shaped key all stop the conversion, each listed by name."""
    cfg = cases.model_config(CASE, "float32")
    flat = dict(cases.weights(CASE, "float32"))
    del flat["score_model/conv_in/bias"]
    flat["score_model/conv_in/extra"] = np.zeros(3, np.float32)
    flat["score_model/dense0/kernel"] = flat["score_model/dense0/kernel"][:-1]
    convert = jax_convert.params_from_neutral if backend == "jax" else torch_convert.params_from_neutral
    with pytest.raises(ConversionError) as e:
        convert(flat, cfg, "test weights")
    text = str(e.value)
    assert "missing (1):\n    score_model/conv_in/bias" in text
    assert "unexpected (1):\n    score_model/conv_in/extra" in text
    assert "mis-shaped (1):\n    score_model/dense0/kernel: got (16, 64), model has (17, 64)" in text
    assert text.startswith("test weights does not match the model")


def test_torch_state_dict_names_are_checked(tmp_path):
    """A torch file with a misnamed key is refused with the key in the message; a DDP `module.` prefix on
    every key is read through."""
    cfg = cases.model_config(CASE, "float32")
    model = torch_convert.model_from_neutral(cases.weights(CASE, "float32"), cfg)
    state = model.state_dict()
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pt")
    ckpt = torch_convert.load_native(tmp_path / "ddp.pt", cfg)
    assert same_tensors(ckpt.params, cases.weights(CASE, "float32")) == []
    state["score_model.conv_in.kernel"] = state.pop("score_model.conv_in.weight")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConversionError) as e:
        torch_convert.load_native(tmp_path / "bad.pt", cfg)
    assert "bad.pt ['model'] does not match the model" in str(e.value)
    assert "missing (1):\n    score_model.conv_in.weight" in str(e.value)
    assert "unexpected (1):\n    score_model.conv_in.kernel" in str(e.value)


def test_missing_optimizer_state_needs_fresh_optimizer():
    ckpt = measure.initial_checkpoint(CASE, "float32")
    for convert in (jax_convert.state_from_neutral, torch_convert.state_from_neutral):
        with pytest.raises(ConversionError, match="no optimizer state"):
            convert(ckpt, cases.optimizer_config())


def test_cli_round_trip(tmp_path, capsys):
    """convert.py: torch checkpoint -> neutral -> torch checkpoint is bit-exact (model, EMA, AdamW state,
    step); neutral -> msgpack (EMA) -> neutral gives the EMA back; errors exit with status 1."""
    config = load_config(QUICKSTART)
    state = torch_steps.create_train_state(model_config(config), config.optimizer, seed=0)
    rs = np.random.RandomState(0)
    images = torch.from_numpy(rs.randint(0, 17, (4, 1, 8, 8)))
    torch_steps.train_step(model_config(config), config.optimizer, state, images, torch.zeros(4))
    original = torch_convert.state_to_checkpoint(state)
    torch.save(original, tmp_path / "a.pt")

    assert convert_cli.main([f"--from={tmp_path / 'a.pt'}", f"--to={tmp_path / 'a.safetensors'}"]) == 0
    assert convert_cli.main([f"--from={tmp_path / 'a.safetensors'}", f"--to={tmp_path / 'b.pt'}",
                             f"--config={QUICKSTART}"]) == 0
    again = torch.load(tmp_path / "b.pt", weights_only=True)
    assert again["step"] == original["step"] == 1 and again["model_config"] == original["model_config"]
    for part in ("model", "ema"):
        assert all(torch.equal(again[part][k], v) for k, v in original[part].items())
    for index, st in original["optimizer"]["state"].items():
        assert all(torch.equal(again["optimizer"]["state"][index][k], v) for k, v in st.items())
    assert again["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]

    assert convert_cli.main([f"--from={tmp_path / 'a.safetensors'}", f"--to={tmp_path / 'ema.msgpack'}",
                             "--weights=ema_params"]) == 0
    assert convert_cli.main([f"--from={tmp_path / 'ema.msgpack'}", f"--to={tmp_path / 'ema.safetensors'}",
                             f"--config={QUICKSTART}"]) == 0
    neutral = load_neutral(tmp_path / "a.safetensors")
    assert same_tensors(load_neutral(tmp_path / "ema.safetensors").params, neutral.ema_params) == []
    capsys.readouterr()

    assert convert_cli.main([f"--from={tmp_path / 'ema.msgpack'}", f"--to={tmp_path / 'x.safetensors'}"]) == 1
    assert "holds no model config" in capsys.readouterr().err
    assert convert_cli.main([f"--from={tmp_path / 'a.pt'}", f"--to={tmp_path / 'a.safetensors'}"]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert convert_cli.main([f"--from={tmp_path / 'nope.pt'}", f"--to={tmp_path / 'n.safetensors'}"]) == 1
    assert "nope.pt does not exist" in capsys.readouterr().err
    assert convert_cli.main([f"--from={tmp_path / 'a.safetensors'}", f"--to={tmp_path / 'c.pt'}"]) == 1
    assert "pass them (convert.py --config=CONFIG)" in capsys.readouterr().err
