"""Property tests: malformed input to the config loader, the data loader and the converter's readers.

Whatever a user types or points these at (random overrides and config.json contents, random .npz files,
random bytes, truncated or bit-flipped checkpoints, well-formed files holding the wrong structure), the
outcome is either a usable value or one of the project's own errors (ConfigError, WorkdirError,
DataError, NeutralFileError, ConversionError / UpstreamError) whose message names the input: the field or
the file. A KeyError, TypeError, zipfile, pickle, msgpack or safetensors error escaping a reader would reach
the user as a traceback instead of `error: ...`; hypothesis searches for those.

Examples are derandomized (the same ones on every run) and few per property, to keep the module fast.
"""
from __future__ import annotations

import functools
import io
import json
import re
import string
import tempfile
from pathlib import Path

import ml_collections
import msgpack
import numpy as np
import pytest
import safetensors.numpy
import yaml

from vdm_common import config as config_lib
from vdm_common import architecture, data, neutral, upstream
from vdm_common.upstream import official, port
from vdm_common import workdir as workdir_lib
from vdm_common.config import ConfigError, ModelConfig
from vdm_common.weights import ConversionError, unflatten_tree

pytest.importorskip("hypothesis")
torch = pytest.importorskip("torch")
flax_serialization = pytest.importorskip("flax.serialization")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402
from vdm_jax import convert as jax_convert  # noqa: E402
from vdm_torch import convert as torch_convert  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.py")

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# A tiny model, for the checkpoints that the readers get in one piece, damaged, or restructured.
TINY = ModelConfig(vocab_size=17, image_channels=1, sm_n_embd=8, sm_n_layer=0, norm_groups=4, sm_pdrop=0.0,
                   with_fourier_features=False)

# --------------------------------------------------------------------------------------- strategies

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8))
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
NAMES = st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=8)


def with_names(real) -> st.SearchStrategy:
    """Keys: mostly the names a reader looks for, sometimes any name."""
    return st.one_of(st.sampled_from(sorted(real, key=str)), NAMES)


def damaged(good: bytes) -> st.SearchStrategy:
    """A valid file truncated at a random length, or with a few random bytes changed, or random bytes."""
    cut = st.integers(0, len(good) - 1).map(lambda n: good[:n])
    flips = st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)), min_size=1, max_size=4)
    flipped = flips.map(lambda fs: _flip(good, fs))
    return st.one_of(cut, flipped, st.binary(max_size=300))


def _flip(good: bytes, flips) -> bytes:
    out = bytearray(good)
    for at, mask in flips:
        out[at] ^= mask
    return bytes(out)


def arrays(max_dims: int = 5) -> st.SearchStrategy:
    """numpy arrays of assorted dtypes and shapes (0-size and 0-d included), any values."""
    dtypes = st.sampled_from([np.uint8, np.int8, np.int64, np.uint16, np.float32, np.float64, np.bool_])
    shapes = hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=3)
    return st.tuples(dtypes, shapes).flatmap(lambda ds: hnp.arrays(ds[0], ds[1]))


def tree_of(leaves, keys) -> st.SearchStrategy:
    """Nested dicts (and some lists) of `leaves` under `keys`."""
    return st.recursive(leaves, lambda inner: st.dictionaries(keys, inner, max_size=4)
                        | st.lists(inner, max_size=2), max_leaves=10)


def _containers(obj, found: list) -> list:
    """Every dict and list inside obj, obj first."""
    if isinstance(obj, (dict, list)):
        found.append(obj)
        for value in obj.values() if isinstance(obj, dict) else obj:
            _containers(value, found)
    return found


@st.composite
def restructured(draw, load, leaves, keys):
    """A valid structure (`load()`: a fresh copy) with 1 to 3 entries, anywhere in it, replaced by `leaves`,
    removed, or added under `keys`: files that read as the right kind but hold the wrong structure."""
    obj = load()
    for _ in range(draw(st.integers(1, 3))):
        node = draw(st.sampled_from(_containers(obj, [])))
        slots = list(node) if isinstance(node, dict) else list(range(len(node)))
        action = draw(st.sampled_from(["replace", "remove", "add"])) if slots else "add"
        if action == "add" and isinstance(node, dict):
            node[draw(keys)] = draw(leaves)
        elif action == "add":
            node.append(draw(leaves))
        elif action == "remove":
            del node[draw(st.sampled_from(slots))]
        else:
            node[draw(st.sampled_from(slots))] = draw(leaves)
    return obj


# ----------------------------------------------------------------------------------------- checks

def names_a_field(message: str) -> bool:
    return re.search(r"config\.[A-Za-z_]|override", message) is not None


def assert_clear(error: BaseException, input_name: str | None = None) -> None:
    """A non-empty message that names the input: the file (`input_name`) or, without one, a config field."""
    message = str(error)
    assert message.strip(), type(error)
    if input_name is None:
        assert names_a_field(message), message
    else:
        assert input_name in message, message


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder per module: each example rewrites its file (hypothesis runs a test body many times)."""
    return tmp_path_factory.mktemp("properties")


# --------------------------------------------------------------------------------------- (a) config

SCHEMA = dict(config_lib.default_training(), model=ModelConfig().to_dict())
REAL_FIELDS = [f"{section}.{field}" for section, fields in SCHEMA.items() for field in fields]
MADE_UP_FIELDS = ["model.sm_n_embed", "training.bogus", "nosuch.field", "model", "training",
                  "model.sm_n_layer.depth", "", ".", "model.", "data.npz_path.x.y"]
FIELD_KEYS = st.one_of(st.sampled_from(REAL_FIELDS), st.sampled_from(MADE_UP_FIELDS), st.text(max_size=12))


@PROPERTY
@given(overrides=st.lists(st.tuples(FIELD_KEYS, JSONISH), min_size=1, max_size=3))
def test_config_overrides_of_any_value_give_a_config_error_or_a_valid_config(overrides):
    config = config_lib.load_config(QUICKSTART)
    try:
        for key, value in overrides:
            config_lib.set_field(config, key, value)
        config_lib.validate(config)
    except ConfigError as e:
        assert_clear(e)
        return
    config_lib.model_config(config)          # a config that validates builds its model config


@PROPERTY
@given(items=st.lists(st.tuples(FIELD_KEYS, st.one_of(st.text(max_size=12), JSONISH.map(repr))),
                      min_size=1, max_size=3))
def test_config_override_strings_as_typed_on_a_command_line(items):
    overrides = [f"{key}={raw}" for key, raw in items]
    try:
        config_lib.load_config(QUICKSTART, overrides)
    except ConfigError as e:
        assert_clear(e)


@st.composite
def stored_trees(draw) -> dict:
    """A valid stored config with a few fields changed, removed or added, or whole sections replaced."""
    tree = json.loads(json.dumps(config_lib.load_config(QUICKSTART).to_dict()))
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from([*tree, "extra"]))
        action = draw(st.sampled_from(["set", "delete", "add", "replace"]))
        fields = tree.get(section)
        if action == "replace" or not isinstance(fields, dict):
            tree[section] = draw(JSONISH)
        elif action == "set" and fields:
            fields[draw(st.sampled_from(sorted(fields)))] = draw(JSONISH)
        elif action == "delete" and fields:
            del fields[draw(st.sampled_from(sorted(fields)))]
        else:
            fields[draw(st.text(max_size=10))] = draw(JSONISH)
    return tree


@PROPERTY
@given(text=st.one_of(stored_trees().map(json.dumps), JSONISH.map(json.dumps), st.text(max_size=40)))
def test_stored_config_json_of_any_content(scratch, text):
    workdir = scratch / "run"
    workdir.mkdir(exist_ok=True)
    (workdir / workdir_lib.CONFIG_FILE).write_text(text)
    try:
        config = workdir_lib.read_config(workdir)
    except workdir_lib.WorkdirError as e:
        assert_clear(e, str(workdir))
        return
    except ConfigError as e:
        assert_clear(e)
        return
    assert isinstance(config, ml_collections.ConfigDict)


# ----------------------------------------------------------------------------------------- (b) data

NPZ_KEYS = with_names({"train", "test", "vocab_size"})
# uint8 images of any rank and size (0 included), any pixel values, and a stored vocab_size or not: what
# passes the dtype check and must then be refused for its shape or values, or loaded.
PIXELS = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=5, min_side=0, max_side=3))
VOCAB = st.one_of(st.integers(-1, 300).map(np.int64), arrays(max_dims=1))
NPZ_CONTENTS = st.one_of(
    st.fixed_dictionaries({"train": PIXELS, "test": PIXELS}, optional={"vocab_size": VOCAB}),
    st.fixed_dictionaries({"train": arrays(), "test": arrays()}, optional={"vocab_size": arrays(max_dims=1)}),
    st.dictionaries(NPZ_KEYS, arrays(), max_size=4))


def _npz_bytes(arrays_by_key: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays_by_key)
    return buffer.getvalue()


GOOD_NPZ = _npz_bytes({"train": np.zeros((4, 2, 2, 1), np.uint8), "test": np.ones((2, 2, 2, 1), np.uint8),
                       "vocab_size": np.int64(3)})


def load_npz(path: Path):
    values = dict(config_lib.default_training()["data"], dataset="npz", npz_path=str(path))
    return data.load_dataset(ml_collections.ConfigDict(values))


@PROPERTY
@given(contents=st.one_of(NPZ_CONTENTS.map(_npz_bytes), damaged(GOOD_NPZ)))
def test_npz_of_any_content_loads_or_names_the_file(scratch, contents):
    path = scratch / "images.npz"
    path.write_bytes(contents)
    try:
        ds = load_npz(path)
    except data.DataError as e:
        assert_clear(e, str(path))
        return
    for split in (ds.train, ds.test):            # what loaded is what the trainers can use
        assert split.dtype == np.uint8 and split.ndim == 4 and split.size and int(split.max()) < ds.vocab_size


# ------------------------------------------------------------------------------ (c) converter readers

def neutral_checkpoint() -> neutral.NeutralCheckpoint:
    zeros = {k: np.zeros(s, np.float32) for k, s in architecture.model_param_shapes(TINY).items()}
    return neutral.NeutralCheckpoint(model_config=TINY, params=zeros, step=3, ema_params=dict(zeros),
                                     opt_mu=dict(zeros), opt_nu=dict(zeros), opt_count=3)


@functools.cache
def good_file(kind: str) -> bytes:
    """A valid file of each kind the converter reads, of the tiny model with its optimizer state."""
    ckpt = neutral_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "good"
        if kind == "neutral":
            neutral.save_neutral(path, ckpt)
        elif kind == "torch":
            torch_convert.save_native(path, ckpt, ml_collections.ConfigDict(config_lib.default_training()["optimizer"]))
        else:
            jax_convert.save_native(path, ckpt)
        return path.read_bytes()


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_object(contents: bytes):
    return torch.load(io.BytesIO(contents), weights_only=True)


def _msgpack_bytes(tree) -> bytes:
    """flax's msgpack (numpy arrays as its extension types) of a tree; a non-dict top level as plain msgpack."""
    if isinstance(tree, dict):
        return flax_serialization.msgpack_serialize(tree)
    return msgpack.packb(tree, default=lambda a: a.tolist())


def file_contents(good: bytes, load, dump, leaves, keys) -> st.SearchStrategy:
    """Damaged copies of a good file, restructured ones (load: bytes -> object, dump: object -> bytes), and
    random structures of the same kind of file."""
    return st.one_of(damaged(good), restructured(lambda: load(good), leaves, keys).map(dump),
                     tree_of(leaves, keys).map(dump))


TENSORS = arrays(max_dims=3).map(torch.from_numpy)
TORCH_KEYS = with_names({"model", "ema", "optimizer", "step", "model_config", "state", "param_groups",
                         "params", "exp_avg", "exp_avg_sq", "vocab_size", "gamma.w", "module.gamma.w", 0, 1})
TORCH_LEAVES = st.one_of(SCALARS, TENSORS, st.dictionaries(TORCH_KEYS, st.one_of(SCALARS, TENSORS), max_size=3))


@PROPERTY
@given(data_=st.data(), model_config=st.sampled_from([None, TINY]))
def test_torch_reader_on_malformed_files(scratch, data_, model_config):
    path = scratch / "ckpt.pt"
    path.write_bytes(data_.draw(file_contents(good_file("torch"), _torch_object, _torch_bytes, TORCH_LEAVES,
                                              TORCH_KEYS)))
    try:
        torch_convert.load_native(path, model_config)
    except ConversionError as e:
        assert_clear(e, str(path))


MSGPACK_KEYS = with_names({"params", "score_model", "gamma", "w", "b", "conv_in", "kernel", "bias", "step",
                           "ema_params", "opt_state", "count", "mu", "nu", "__msgpack_chunked_array__",
                           "shape", "chunks", "0", "1"})
MSGPACK_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=8),
                            st.binary(max_size=8))
MSGPACK_LEAVES = st.one_of(MSGPACK_SCALARS, arrays(max_dims=3),
                           st.dictionaries(MSGPACK_KEYS, st.one_of(MSGPACK_SCALARS, arrays(max_dims=3)), max_size=3))


@PROPERTY
@given(data_=st.data())
def test_flax_msgpack_reader_on_malformed_files(scratch, data_):
    path = scratch / "params.msgpack"
    path.write_bytes(data_.draw(file_contents(good_file("msgpack"), flax_serialization.msgpack_restore,
                                              _msgpack_bytes, MSGPACK_LEAVES, MSGPACK_KEYS)))
    try:
        jax_convert.load_native(path, TINY)
    except ConversionError as e:
        assert_clear(e, str(path))


META_KEYS = with_names({"format", "format_version", "model_config", "step", "opt_count", "extra"})
META_VALUES = st.one_of(st.text(max_size=12), JSONISH.map(json.dumps), st.just(TINY.to_json()))
TENSOR_NAMES = with_names({f"{prefix}{key}" for prefix in neutral.PREFIXES.values()
                           for key in ("gamma/w", "gamma/b", "score_model/conv_in/kernel")})


def _safetensors_bytes(parts: dict) -> bytes:
    tensors = {k: np.ascontiguousarray(v) for k, v in parts["tensors"].items()}
    return safetensors.numpy.save(tensors, metadata=parts["metadata"])


def _safetensors_parts(contents: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(contents)
        f.flush()
        metadata = neutral.read_metadata(f.name)
    return {"tensors": safetensors.numpy.load(contents), "metadata": metadata}


def _raw_header(header) -> bytes:
    """A safetensors-like file whose JSON header is anything (the library would refuse to write it)."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


@st.composite
def neutral_restructured(draw) -> bytes:
    """The good neutral file with tensors replaced, renamed or removed, and metadata strings changed."""
    parts = _safetensors_parts(good_file("neutral"))
    for _ in range(draw(st.integers(1, 3))):
        name, keys, values = draw(st.sampled_from([("tensors", TENSOR_NAMES, arrays(max_dims=3)),
                                                   ("metadata", META_KEYS, META_VALUES)]))
        entries = parts[name]
        if entries and draw(st.booleans()):
            del entries[draw(st.sampled_from(sorted(entries)))]
        else:
            entries[draw(st.one_of(keys, st.sampled_from(sorted(entries) or ["step"])))] = draw(values)
    return _safetensors_bytes(parts)


@PROPERTY
@given(contents=st.one_of(damaged(good_file("neutral")), neutral_restructured(),
                          st.builds(_raw_header, st.fixed_dictionaries({"__metadata__": JSONISH}))))
def test_neutral_reader_on_malformed_files(scratch, contents):
    path = scratch / "ckpt.safetensors"
    path.write_bytes(contents)
    try:
        neutral.load_neutral(path)
    except (neutral.NeutralFileError, ConversionError) as e:
        assert_clear(e, str(path))


@functools.cache
def official_state_bytes() -> bytes:
    """ckpt-N.flax of an official TrainState of the tiny model, as clu writes it (flax msgpack)."""
    params = unflatten_tree({k: np.zeros(s, np.float32) for k, s in architecture.model_param_shapes(TINY).items()})
    state = {"step": np.asarray(3), "params": params, "ema_params": params,
             "opt_state": {"0": {"count": np.asarray(3), "mu": params, "nu": params}}}
    return flax_serialization.msgpack_serialize(state)


@PROPERTY
@given(data_=st.data())
def test_official_reader_on_malformed_checkpoints(scratch, data_):
    directory = scratch / "official" / "checkpoints-0"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ckpt-3.flax").write_bytes(data_.draw(file_contents(
        official_state_bytes(), flax_serialization.msgpack_restore, _msgpack_bytes, MSGPACK_LEAVES, MSGPACK_KEYS)))
    try:
        official.read_official(directory, TINY)
    except upstream.UpstreamError as e:
        assert_clear(e, str(directory))


PORT_CFG = dict(embedding_dim=8, n_blocks=0, n_attention_heads=1, dropout_prob=0.0, norm_groups=4, input_channels=1,
                use_fourier_features=False, attention_everywhere=False, batch_size=4, noise_schedule="learned_linear",
                gamma_min=-13.3, gamma_max=5.0, antithetic_time_sampling=True, lr=2e-4, weight_decay=0.01,
                clip_grad_norm=True)


@functools.cache
def port_model_bytes() -> bytes:
    """model.pt of a port run of PORT_CFG as its trainer saves it: weights, EMA, AdamW after one step."""
    model = {k: torch.zeros(s) for k, s in port.port_param_layout(PORT_CFG).items()}
    params = [torch.nn.Parameter(v.clone()) for v in model.values()]
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    ema = {"initted": torch.tensor([1.0]), "step": torch.tensor([3]),
           **{f"ema_model.{k}": v for k, v in model.items()}}
    return _torch_bytes({"step": 3, "model": model, "opt": opt.state_dict(), "ema": ema})


@st.composite
def port_configs(draw) -> str:
    """config.yaml text: the valid mapping with fields changed, removed or added; or any YAML; or any text."""
    cfg = dict(PORT_CFG)
    for _ in range(draw(st.integers(0, 3))):
        field = draw(with_names(set(PORT_CFG)))
        if draw(st.booleans()):
            cfg[field] = draw(JSONISH)
        else:
            cfg.pop(field, None)
    return draw(st.one_of(st.just(yaml.safe_dump(cfg)), JSONISH.map(yaml.safe_dump), st.text(max_size=40)))


PORT_KEYS = with_names({"step", "model", "opt", "ema", "state", "param_groups", "params", "initted", "exp_avg",
                        *port.port_param_layout(PORT_CFG), "ema_model.gamma.w", "online_model.gamma.w", 0})


@PROPERTY
@given(data_=st.data(), valid_config=st.booleans())
def test_port_reader_on_malformed_runs(scratch, data_, valid_config):
    directory = scratch / "port"
    directory.mkdir(exist_ok=True)
    (directory / "model.pt").write_bytes(data_.draw(file_contents(port_model_bytes(), _torch_object, _torch_bytes,
                                                                  TORCH_LEAVES, PORT_KEYS)))
    (directory / "config.yaml").write_text(yaml.safe_dump(PORT_CFG) if valid_config else data_.draw(port_configs()))
    try:
        port.read_port(directory)
    except upstream.UpstreamError as e:
        assert_clear(e, str(directory))
