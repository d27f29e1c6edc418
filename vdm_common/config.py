"""The one config schema shared by both backends, and its validation.

A config is an `ml_collections.ConfigDict` with four sections, written by a `get_config()` file in
`configs/` and overridden from the command line (`--config.training.batch_size_train=64`):

  model      the VDM: data vocabulary, noise schedule, score UNet, precision (see `ModelConfig`)
  training   seed, steps, batch sizes, logging / eval / checkpoint / sampling cadence
  optimizer  AdamW, LR warmup, gradient clipping, EMA
  data       which data set and where it lives

`validate(config)` checks every field once, at the boundary, and raises `ConfigError` naming the field,
the bad value and what is allowed; the backends then trust the values.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

from vdm_common.errors import UserError

GAMMA_TYPES = ("fixed", "learnable_scalar", "learnable_nnet", "learnable_nnet_endpoints")
FOURIER_ORDERS = ("channel_major", "frequency_major")
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")
DATASETS = ("digits", "cifar10", "cifar10_aug", "imagenet32", "npz")
# Upper bounds far beyond any real model; above them, building even the shapes of the parameters takes
# minutes (layers) or overflows torch's size arithmetic (channels).
MAX_LAYERS = 1024
MAX_WIDTH = 65536


class ConfigError(UserError, ValueError):
    """A config field holds a value the project cannot use; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The fields that define the model's function (and so its weights). Shared by both backends.

    Defaults are those of the official CIFAR-10 model.
    """

    vocab_size: int = 256              # pixel values are integers in [0, vocab_size)
    image_channels: int = 3            # C of the images (and of z)
    sample_softmax: bool = False       # generate_x: sample the decoder (True) or take its argmax
    antithetic_time_sampling: bool = True
    # Noise schedule gamma(t) = -log SNR(t), increasing from gamma_min to gamma_max (at init).
    gamma_type: str = "learnable_scalar"
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    # learnable_nnet_endpoints only: train the schedule's shape to minimise the variance of the diffusion
    # loss estimate (paper Appendix I.2) while the endpoints follow the VLB.
    variance_minimisation: bool = False
    # Score UNet.
    sm_n_timesteps: int = 0            # 0: continuous-time loss; T > 0: discrete-time loss with T steps
    sm_n_embd: int = 128               # channels of every block
    sm_n_layer: int = 32               # resnet blocks on the way down (and +1 on the way up)
    sm_pdrop: float = 0.1              # dropout inside each resnet block
    with_fourier_features: bool = True
    fourier_start: int = 6             # base-2 Fourier exponents start..stop-1 (official: 6, 7)
    fourier_stop: int = 8
    fourier_order: str = "channel_major"   # official: [c0f6, c0f7, c1f6, ...]; the torch port: frequency-major
    with_attention: bool = False       # attention after every down / up block (the middle always has one)
    attention_heads: int = 1
    norm_groups: int = 32              # GroupNorm groups everywhere
    norm_eps: float = 1e-6             # GroupNorm epsilon (Flax's default; the torch port used 1e-5)
    compute_dtype: str = "float32"     # UNet activations; params, t, gamma and the loss stay float32

    @classmethod
    def from_config(cls, model: Any) -> "ModelConfig":
        """Builds the dataclass from a `config.model` ConfigDict or dict (unknown keys are an error)."""
        if not isinstance(model, (Mapping, ml_collections.ConfigDict)):
            raise ConfigError(f"config.model must be a mapping of model fields, got {type(model).__name__} "
                              f"{model!r:.80}")
        values = dict(model.to_dict() if hasattr(model, "to_dict") else model)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names, key=str)
        if unknown:
            raise ConfigError(f"config.model has unknown fields {unknown}; known fields: {sorted(names)}")
        mc = cls(**values)
        validate_model(mc)
        return mc

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_config(json.loads(text))


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field} = {value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool): nan and inf would only surface later as a nan loss."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_model(m: ModelConfig) -> None:
    """Raises ConfigError for the first field of the model config that the model cannot use."""
    for field in dataclasses.fields(m):
        value = getattr(m, field.name)
        if field.type == "bool":
            _require(isinstance(value, bool), f"model.{field.name}", value, "True or False")
        elif field.type == "float":
            _require(_is_number(value), f"model.{field.name}", value, "a finite number")
        elif field.type == "str":
            _require(isinstance(value, str), f"model.{field.name}", value, "a string")
    _require(_is_int(m.vocab_size) and m.vocab_size >= 2, "model.vocab_size", m.vocab_size, "an integer >= 2")
    _require(_is_int(m.image_channels) and 1 <= m.image_channels <= MAX_WIDTH, "model.image_channels",
             m.image_channels, f"an integer in [1, {MAX_WIDTH}]")
    _require(m.gamma_type in GAMMA_TYPES, "model.gamma_type", m.gamma_type, f"one of {GAMMA_TYPES}")
    _require(not m.variance_minimisation or m.gamma_type == "learnable_nnet_endpoints",
             "model.variance_minimisation", m.variance_minimisation,
             "needs model.gamma_type = 'learnable_nnet_endpoints' (a schedule whose shape is separate from its "
             f"endpoints), not {m.gamma_type!r}")
    _require(not m.variance_minimisation or m.sm_n_timesteps == 0, "model.variance_minimisation",
             m.variance_minimisation, "applies to the continuous-time loss: set model.sm_n_timesteps = 0")
    _require(float(m.gamma_min) < float(m.gamma_max), "model.gamma_min", m.gamma_min,
             f"gamma_min must be below gamma_max ({m.gamma_max}); gamma is -log SNR and increases with t")
    _require(_is_int(m.sm_n_timesteps) and m.sm_n_timesteps >= 0, "model.sm_n_timesteps", m.sm_n_timesteps,
             "0 for the continuous-time loss or a number of steps T >= 1")
    _require(_is_int(m.sm_n_embd) and 4 <= m.sm_n_embd <= MAX_WIDTH and m.sm_n_embd % 2 == 0, "model.sm_n_embd",
             m.sm_n_embd, f"an even integer in [4, {MAX_WIDTH}] (the time embedding needs at least two "
                          f"frequencies)")
    _require(_is_int(m.sm_n_layer) and 0 <= m.sm_n_layer <= MAX_LAYERS, "model.sm_n_layer", m.sm_n_layer,
             f"an integer in [0, {MAX_LAYERS}]")
    _require(0.0 <= m.sm_pdrop < 1.0, "model.sm_pdrop", m.sm_pdrop, "a probability in [0, 1)")
    _require(_is_int(m.fourier_start) and _is_int(m.fourier_stop)
             and m.fourier_start < m.fourier_stop <= m.fourier_start + MAX_WIDTH,
             "model.fourier_start", (m.fourier_start, m.fourier_stop),
             f"integers with fourier_start < fourier_stop <= fourier_start + {MAX_WIDTH}")
    _require(m.fourier_order in FOURIER_ORDERS, "model.fourier_order", m.fourier_order, f"one of {FOURIER_ORDERS}")
    _require(_is_int(m.attention_heads) and m.attention_heads >= 1 and m.sm_n_embd % m.attention_heads == 0,
             "model.attention_heads", m.attention_heads,
             f"an integer >= 1 that divides model.sm_n_embd ({m.sm_n_embd})")
    _require(_is_int(m.norm_groups) and m.norm_groups >= 1, "model.norm_groups", m.norm_groups, "an integer >= 1")
    # GroupNorm sees sm_n_embd channels, and 2 * sm_n_embd on the concatenated skips of the up path.
    _require(m.sm_n_embd % m.norm_groups == 0, "model.norm_groups", m.norm_groups,
             f"must divide model.sm_n_embd ({m.sm_n_embd}); pick a divisor such as "
             f"{max(g for g in range(1, min(32, m.sm_n_embd) + 1) if m.sm_n_embd % g == 0)}")
    _require(float(m.norm_eps) > 0, "model.norm_eps", m.norm_eps, "a positive float")
    _require(m.compute_dtype in COMPUTE_DTYPES, "model.compute_dtype", m.compute_dtype, f"one of {COMPUTE_DTYPES}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a whole config (all four sections); returns it unchanged or raises ConfigError."""
    _check_fields(config)
    ModelConfig.from_config(config.model)
    t, o, d = config.training, config.optimizer, config.data
    for name in ("num_steps_train", "batch_size_train", "batch_size_eval", "substeps", "steps_per_logging",
                 "steps_per_eval", "steps_per_save", "checkpoints_to_keep", "sample_steps", "num_samples"):
        _require(_is_int(t[name]) and t[name] >= 1, f"training.{name}", t[name], "an integer >= 1")
    _require(_is_int(t.seed), "training.seed", t.seed, "an integer")
    _require(_is_int(t.steps_per_sample) and t.steps_per_sample >= 0, "training.steps_per_sample",
             t.steps_per_sample, "an integer >= 0 (0: no sample grids during training)")
    _require(_is_int(t.num_eval_batches) and t.num_eval_batches >= 0, "training.num_eval_batches",
             t.num_eval_batches, "an integer >= 0 (0: the whole test split)")
    _require(_is_int(t.eval_timesteps) and t.eval_timesteps >= -1, "training.eval_timesteps", t.eval_timesteps,
             "-1 (the bound the model trains on), 0 (continuous-time bound) or a number of steps T >= 1")
    _require(_is_int(t.eval_noise_samples) and t.eval_noise_samples >= 1, "training.eval_noise_samples",
             t.eval_noise_samples, "an integer >= 1")
    _require(_is_int(t.max_nonfinite_steps) and t.max_nonfinite_steps >= 1, "training.max_nonfinite_steps",
             t.max_nonfinite_steps, "an integer >= 1 (steps with a non-finite loss or gradient are skipped; the "
             "run stops after this many in a row)")
    for name in ("steps_per_logging", "steps_per_eval", "steps_per_save"):
        _require(t[name] % t.substeps == 0, f"training.{name}", t[name],
                 f"a multiple of training.substeps ({t.substeps}): the host sees the state every substeps steps")
    _require(_is_number(o.learning_rate) and o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate,
             "a finite float > 0")
    for name in ("b1", "b2"):
        _require(_is_number(o[name]) and 0.0 <= o[name] < 1.0, f"optimizer.{name}", o[name], "a float in [0, 1)")
    _require(_is_number(o.eps) and o.eps > 0, "optimizer.eps", o.eps, "a finite float > 0")
    _require(_is_number(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay,
             "a finite float >= 0")
    _require(_is_number(o.ema_rate) and 0.0 <= o.ema_rate < 1.0, "optimizer.ema_rate", o.ema_rate,
             "a float in [0, 1)")
    _require(_is_int(o.num_steps_lr_warmup) and o.num_steps_lr_warmup >= 0, "optimizer.num_steps_lr_warmup",
             o.num_steps_lr_warmup, "an integer >= 0")
    _require(_is_number(o.grad_clip_norm) and o.grad_clip_norm >= 0, "optimizer.grad_clip_norm",
             o.grad_clip_norm, "a finite float >= 0 (0: no clipping)")
    for name in ("data_dir", "manual_dir", "npz_path"):
        _require(isinstance(d[name], str), f"data.{name}", d[name], "a path (a string; '' for none)")
    _require(d.dataset in DATASETS, "data.dataset", d.dataset, f"one of {DATASETS}")
    if d.dataset == "npz":
        _require(bool(d.npz_path), "data.npz_path", d.npz_path,
                 "the path of a .npz file with uint8 arrays 'train' and 'test' (N, H, W, C)")
    return config


def _check_fields(config: Any) -> None:
    """ConfigError unless `config` has exactly the four sections, and training, optimizer and data exactly
    the schema's fields (the model section is checked by ModelConfig.from_config)."""
    schema = default_training()
    sections = ("model", *schema)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"a config must be a ConfigDict with sections {list(sections)}, got "
                          f"{type(config).__name__}; see configs/quickstart.py")
    missing = [s for s in sections if s not in config]
    if missing:
        raise ConfigError(f"config.{missing[0]} is missing; a config file defines model, training, "
                          f"optimizer and data (see configs/quickstart.py)")
    unknown = sorted(set(config.keys()) - set(sections), key=str)
    if unknown:
        raise ConfigError(f"unknown config sections {[f'config.{u}' for u in unknown]}; the sections are "
                          f"{list(sections)}")
    for section, fields in schema.items():
        node = config[section]
        if not isinstance(node, (Mapping, ml_collections.ConfigDict)):
            raise ConfigError(f"config.{section} must be a section of fields, got {type(node).__name__} "
                              f"{node!r:.80}; see configs/quickstart.py")
        unknown = sorted(set(node.keys()) - set(fields), key=str)
        if unknown:
            raise ConfigError(f"config.{section} has unknown fields {unknown}; known fields: {sorted(fields)}")
        missing = sorted(set(fields) - set(node.keys()))
        if missing:
            raise ConfigError(f"config.{section} lacks the fields {missing}; add them (their defaults are in "
                              f"vdm_common.config.default_training)")


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file, applies `a.b=value` overrides, and validates.

    Overrides are parsed as Python literals where possible (`model.sm_n_layer=4`, `data.dataset=npz`).
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass one of configs/*.py")
    spec = importlib.util.spec_from_file_location("_vdm_config_file", path)
    if spec is None:
        raise ConfigError(f"config file {path!r} is not a Python file; pass one of configs/*.py (a .py file "
                          f"with a get_config() function)")
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        config = get_config() if callable(get_config) else None
    except Exception as e:  # the user's own code: whatever it raises is reported, with its message
        raise ConfigError(f"config file {path!r} failed to load: {type(e).__name__}: {e}; fix the file or pass "
                          f"one of configs/*.py") from e
    if not callable(get_config):
        raise ConfigError(f"config file {path!r} has no get_config() function")
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path!r}: get_config() returned a {type(config).__name__}, not an "
                          f"ml_collections.ConfigDict (see configs/quickstart.py)")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        check_override_names([key.strip()])
        set_field(config, key.strip(), _parse_literal(raw.strip()))
    return validate(config)


def check_override_names(names: Iterable[str]) -> None:
    """ConfigError for the first `section.field` the schema lacks. The entry scripts check their
    --config.section.field=value names with it before ml_collections parses them (which raises a bare
    KeyError for a field the config lacks)."""
    schema = dict(model=ModelConfig().to_dict(), **default_training())
    for name in names:
        section, _, field = name.partition(".")
        if section not in schema:
            raise ConfigError(f"override config.{name}: there is no section {section!r}; the sections are "
                              f"{list(schema)}")
        if field not in schema[section]:
            what = f"unknown field {field!r}" if field else "a whole section; override its fields one by one"
            raise ConfigError(f"override config.{name}: {what}; known: {sorted(schema[section])}")


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """Sets config.<dotted> = value, refusing fields the schema does not have."""
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"override config.{dotted}: there is no section {part!r}")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"override config.{dotted}: config.{dotted.rpartition('.')[0]} is a field, not a "
                          f"section; write section.field=value")
    if leaf not in node:
        raise ConfigError(f"override config.{dotted}: unknown field {leaf!r}; known: {sorted(node.keys())}")
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict):
        raise ConfigError(f"override config.{dotted}: that is a whole section; override its fields one by one "
                          f"(config.{dotted}.FIELD=value)")
    if isinstance(old, float) and _is_int(value):
        value = float(value)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as err:  # ConfigDict's type check; ValueError: a dict value with dotted keys
        expected = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}.get(
            type(old), f"a {type(old).__name__}")
        raise ConfigError(f"override config.{dotted} = {value!r}: expected {expected} like the current value "
                          f"{old!r}") from err


def _parse_literal(raw: str) -> Any:
    import ast
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # e.g. '{[]: 1}' is a TypeError
        return raw


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen `ModelConfig` of a full config."""
    return ModelConfig.from_config(config.model)


def default_training() -> dict:
    """Training, optimizer and data sections shared by the config files (each overrides what differs)."""
    return dict(
        training=dict(
            seed=1,
            num_steps_train=100_000_000,
            batch_size_train=128,
            batch_size_eval=128,
            substeps=1000,                # optimizer steps per host call (lax.scan in JAX)
            steps_per_logging=1000,
            steps_per_eval=10_000,
            steps_per_save=100_000,
            steps_per_sample=0,
            checkpoints_to_keep=3,
            num_eval_batches=100,         # 0: evaluate on the whole test split
            eval_timesteps=-1,            # the bound eval reports: -1 the trained loss's, 0 continuous, T discrete
            eval_noise_samples=1,         # noise draws (t, eps) per test image, averaged per image
            sample_steps=1000,            # T of the ancestral sampler
            num_samples=64,
            max_nonfinite_steps=5,        # stop after this many skipped (non-finite) steps in a row
        ),
        optimizer=dict(
            learning_rate=2e-4,
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            weight_decay=0.01,
            num_steps_lr_warmup=100,
            grad_clip_norm=0.0,
            ema_rate=0.9999,
        ),
        data=dict(dataset="cifar10", data_dir="", manual_dir="", npz_path=""),
    )


def with_defaults(tree: dict) -> dict:
    """A stored config (nested dict) with the fields added to the schema since it was written set to their
    defaults, so run directories of earlier versions keep working. Unknown fields are kept (and refused by
    validation); a tree that is not {section: {field: value}} is refused here, naming the section."""
    base = dict(default_training(), model=ModelConfig().to_dict())
    if not isinstance(tree, dict):
        raise ConfigError(f"the run's config.json must hold a JSON object of sections {sorted(base)}, got "
                          f"{type(tree).__name__} {tree!r:.80}; restore it, or use a new --workdir")
    for name, values in tree.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config.json: section {name!r} must be an object of fields, got "
                              f"{type(values).__name__} {values!r:.80}; restore it, or use a new --workdir")
        dotted = _dotted_key(values, f"config.{name}.")
        if "." in name or dotted:
            raise ConfigError(f"config.json: {dotted or 'config.' + name} has a dot in a name; fields are plain "
                              f"names (restore the file, or use a new --workdir)")
    out = {name: dict(values) for name, values in tree.items()}
    for section, defaults in base.items():
        if isinstance(out.get(section), dict):
            out[section] = {**defaults, **out[section]}
    return out


def _dotted_key(tree: dict, prefix: str) -> str | None:
    """The first key (as a dotted path) of a nested dict that holds a dot, which ConfigDict refuses."""
    for key, value in tree.items():
        if "." in key:
            return f"{prefix}{key}"
        found = _dotted_key(value, f"{prefix}{key}.") if isinstance(value, dict) else None
        if found:
            return found
    return None


def make_config(model: dict, **sections: dict) -> ml_collections.ConfigDict:
    """A full config: ModelConfig defaults updated by `model`, the shared defaults by `sections`."""
    base = default_training()
    for name, values in sections.items():
        unknown = set(values) - set(base[name])
        if unknown:
            raise ConfigError(f"config.{name} has unknown fields {sorted(unknown)}")
        base[name].update(values)
    full_model = ModelConfig().to_dict()
    unknown = set(model) - set(full_model)
    if unknown:
        raise ConfigError(f"config.model has unknown fields {sorted(unknown)}")
    full_model.update(model)
    return ml_collections.ConfigDict(dict(model=full_model, **base))
