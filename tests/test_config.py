"""Tests of the shared config schema (vdm_common.config): the config files, overrides, validation messages."""
from __future__ import annotations

import dataclasses
import pathlib

import pytest

from vdm_common import config as config_lib
from vdm_common.config import ConfigError, ModelConfig, load_config, model_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p for p in CONFIGS.glob("*.py") if p.name != "__init__.py")
QUICKSTART = str(CONFIGS / "quickstart.py")


def test_config_files_are_all_found():
    assert {p.stem for p in CONFIG_FILES} >= {"quickstart", "cifar10", "cifar10_aug", "imagenet32"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_file_loads_and_validates(path):
    config = load_config(str(path))
    assert set(config) >= {"model", "training", "optimizer", "data"}
    assert config_lib.validate(config) is config
    mc = model_config(config)
    assert mc.to_dict() == config.model.to_dict()
    # The file's docstring tells how to run it.
    assert f"--config=configs/{path.name}" in path.read_text() or path.stem == "quickstart"


def test_cifar10_has_the_official_values():
    config = load_config(str(CONFIGS / "cifar10.py"))
    m, o, t = config.model, config.optimizer, config.training
    assert (m.vocab_size, m.image_channels) == (256, 3)
    assert (m.sm_n_embd, m.sm_n_layer, m.sm_pdrop) == (128, 32, 0.1)
    assert m.with_fourier_features and (m.fourier_start, m.fourier_stop, m.fourier_order) == (6, 8, "channel_major")
    assert not m.with_attention
    assert m.gamma_type == "learnable_scalar" and (m.gamma_min, m.gamma_max) == (-13.3, 5.0)
    assert m.sm_n_timesteps == 0 and m.antithetic_time_sampling
    assert (m.norm_groups, m.norm_eps) == (32, 1e-6)                    # Flax GroupNorm defaults
    assert m.compute_dtype == "float32"
    assert (o.learning_rate, o.b1, o.b2, o.weight_decay, o.eps) == (2e-4, 0.9, 0.99, 0.01, 1e-8)
    assert o.ema_rate == 0.9999
    assert t.batch_size_train == 128
    assert config.data.dataset == "cifar10"


def test_overrides_parse_ints_floats_strings_bools():
    layers = load_config(QUICKSTART).model.sm_n_layer
    config = load_config(QUICKSTART, [
        f"model.sm_n_layer={layers + 1}", "optimizer.learning_rate=1e-3", "model.gamma_min=-9",
        "model.gamma_type=fixed", "model.with_attention=True", "training.seed = 7",
        "model.fourier_order='frequency_major'",
    ])
    m = config.model
    assert m.sm_n_layer == layers + 1 and type(m.sm_n_layer) is int
    assert config.optimizer.learning_rate == 1e-3
    assert m.gamma_min == -9.0 and type(m.gamma_min) is float           # int literal into a float field
    assert m.gamma_type == "fixed"
    assert m.with_attention is True
    assert config.training.seed == 7
    assert m.fourier_order == "frequency_major"                          # quoted or bare strings both work
    assert model_config(config).gamma_min == -9.0
    # The file itself is untouched by a previous load's overrides.
    assert load_config(QUICKSTART).model.sm_n_layer == layers


def test_override_bools_in_lowercase():
    """`--config.model.with_attention=false` is how absl / ml_collections users write a bool."""
    config = load_config(QUICKSTART, ["model.with_attention=true", "model.sample_softmax=false"])
    assert config.model.with_attention is True and config.model.sample_softmax is False


@pytest.mark.parametrize("override,field", [
    ("model.sm_n_layer=2.5", "model.sm_n_layer"),
    ("model.with_attention=maybe", "model.with_attention"),
    ("data.dataset=3", "data.dataset"),
])
def test_override_of_the_wrong_type_is_a_config_error(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(QUICKSTART, [override])


def test_model_config_json_round_trip():
    for mc in (model_config(load_config(str(CONFIGS / "cifar10.py"))),
               ModelConfig.from_config(dict(vocab_size=17, image_channels=1, gamma_type="learnable_nnet",
                                            gamma_min=-8.0, gamma_max=6.0, sm_n_timesteps=1000, sm_n_embd=32,
                                            sm_n_layer=2, sm_pdrop=0.0, norm_groups=8, with_attention=True,
                                            attention_heads=2, fourier_order="frequency_major",
                                            compute_dtype="float64", sample_softmax=True))):
        text = mc.to_json()
        back = ModelConfig.from_json(text)
        assert back == mc and back.to_json() == text
        assert {f.name: type(getattr(back, f.name)) for f in dataclasses.fields(back)} == \
               {f.name: type(getattr(mc, f.name)) for f in dataclasses.fields(mc)}


# --------------------------------------------------------------------------------------- config errors

MODEL_ERRORS = {
    "groups do not divide channels": (dict(sm_n_embd=48, norm_groups=32),
                                      r"config\.model\.norm_groups = 32.*must divide model\.sm_n_embd \(48\)"),
    "gamma_min == gamma_max": (dict(gamma_min=5.0, gamma_max=5.0), r"config\.model\.gamma_min = 5\.0.*below gamma_max"),
    "gamma_min > gamma_max": (dict(gamma_min=6.0, gamma_max=-13.3), r"config\.model\.gamma_min = 6\.0"),
    "unknown gamma_type": (dict(gamma_type="cosine"), r"config\.model\.gamma_type = 'cosine'.*learnable_scalar"),
    "unknown field": (dict(sm_n_embed=64), r"config\.model has unknown fields \['sm_n_embed'\]"),
    "vocab 1": (dict(vocab_size=1), r"config\.model\.vocab_size = 1"),
    "odd channels": (dict(sm_n_embd=33, norm_groups=1), r"config\.model\.sm_n_embd = 33.*even"),
    "heads do not divide": (dict(sm_n_embd=32, norm_groups=8, attention_heads=3),
                            r"config\.model\.attention_heads = 3"),
    "dropout 1": (dict(sm_pdrop=1.0), r"config\.model\.sm_pdrop = 1\.0"),
    "fourier range": (dict(fourier_start=8, fourier_stop=6), r"config\.model\.fourier_start = \(8, 6\)"),
    "fourier order": (dict(fourier_order="random"), r"config\.model\.fourier_order = 'random'"),
    "compute dtype": (dict(compute_dtype="float16"), r"config\.model\.compute_dtype = 'float16'.*bfloat16"),
    "negative T": (dict(sm_n_timesteps=-1), r"config\.model\.sm_n_timesteps = -1"),
    "norm eps": (dict(norm_eps=0.0), r"config\.model\.norm_eps = 0\.0"),
    "variance minimisation needs endpoints": (dict(variance_minimisation=True, gamma_type="learnable_nnet"),
                                              r"config\.model\.variance_minimisation = True.*learnable_nnet_endpoints"),
    # The sinusoidal time embedding divides by sm_n_embd / 2 - 1: two channels cannot build a model.
    "two channels": (dict(sm_n_embd=2, norm_groups=2), r"config\.model\.sm_n_embd = 2"),
    # Typed fields (a JSON or dict config bypasses ConfigDict's type checks): the string 'false' is truthy
    # and would build the attention blocks; a string gamma_min must not surface as a bare float() error.
    "bool field as a string": (dict(with_attention="false"), r"config\.model\.with_attention = 'false'"),
    "float field as a string": (dict(gamma_min="low"), r"config\.model\.gamma_min = 'low'"),
}


@pytest.mark.parametrize("case", list(MODEL_ERRORS))
def test_model_config_error_names_the_field(case):
    fields, match = MODEL_ERRORS[case]
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_config(fields)


LOAD_ERRORS = {
    "groups via override": (["model.sm_n_embd=32", "model.norm_groups=5"],
                            r"config\.model\.norm_groups = 5.*sm_n_embd \(32\)"),
    "gamma range via override": (["model.gamma_min=7"], r"config\.model\.gamma_min = 7\.0"),
    "gamma_type via override": (["model.gamma_type=cosine"], r"config\.model\.gamma_type = 'cosine'"),
    "unknown field": (["model.sm_n_embed=64"], r"config\.model\.sm_n_embed: unknown field 'sm_n_embed'"),
    "unknown section": (["modle.sm_n_embd=64"], r"config\.modle\.sm_n_embd: there is no section 'modle'"),
    "no '='": (["model.sm_n_layer"], r"override 'model\.sm_n_layer' is not of the form section\.field=value"),
    "substeps": (["training.substeps=4", "training.steps_per_logging=6"],
                 r"config\.training\.steps_per_logging = 6.*substeps \(4\)"),
    "npz without path": (["data.dataset=npz"], r"config\.data\.npz_path"),
    "learning rate": (["optimizer.learning_rate=0.0"], r"config\.optimizer\.learning_rate = 0\.0"),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_config_error_names_the_field(case):
    overrides, match = LOAD_ERRORS[case]
    with pytest.raises(ConfigError, match=match):
        load_config(QUICKSTART, overrides)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist; pass one of configs/\*\.py"):
        load_config(str(tmp_path / "nope.py"))
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ConfigError, match=r"has no get_config\(\) function"):
        load_config(str(tmp_path / "empty.py"))
