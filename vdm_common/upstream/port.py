"""Reader of the PyTorch port's runs (addtt/variational-diffusion-models).

A run is `<run>/model.pt` (`torch.save` of {step, model, opt, ema}) and `<run>/config.yaml` (its
TrainConfig). Reading `model.pt` needs torch, imported lazily by `load_torch_checkpoint` only.

The port computes the official function up to these differences, each mapped exactly:

  port                                          here
  Fourier exponents 5, 6, order [f5c0, f5c1..]  fourier_start=5, fourier_stop=7, fourier_order=frequency_major
  nn.GroupNorm: eps 1e-5, `norm_groups` groups  norm_eps=1e-5, norm_groups from config.yaml
  `n_attention_heads` heads                     attention_heads (heads are contiguous channel blocks in both)
  `attention_everywhere`                        with_attention
  no conditioning input: Linear(E, 4E)          dense0 (E + 1, 4E) with a zero row for the conditioning scalar
  fused 1x1 conv C -> 3C (q, k, v), q and k     q, k, v Dense kernels: rows [0:C], [C:2C], [2C:3C] of the conv,
    each scaled by d^-1/4                         transposed; softmax(q.k / sqrt(d)) is the same function
  1x1 `skip_conv`                               nin_shortcut Dense
  `net2.2` (dropout 0) or `net2.3` (Dropout at  conv2
    index 2) conv
  gamma `b`, `w` 0-d                            gamma/b, gamma/w of shape (1,)
  fixed_linear / learned_linear                 fixed / learnable_scalar
  inputs k / 255 in [0, 1]                      integers k (both then encode 2 (k + 1/2) / 256 - 1)

The rest is the same function (float32 rounding aside): the sinusoidal time embedding of t = (gamma_t -
gamma_min) / (gamma_max - gamma_min) scaled by 1000 with frequencies 10000^(-i/(E/2 - 1)) (the port builds
them with `logspace`, within an ulp), the cond-MLP Linear-SiLU-Linear-SiLU, GroupNorm-SiLU-conv blocks with
dropout before the second conv, conv_out after GroupNorm-SiLU plus the input z, the decoder, the KL term and
the continuous-time diffusion loss 0.5 gamma'(t) ||eps - eps_hat||^2 (the port clamps sigma_1^2 at 1e-15
inside the KL's log, which no schedule with gamma_1 > -34 reaches). Not part of the function, so not
mapped: its training recipe (see `port_config_sections`) and its sampler's default clipping of the
predicted x0 to [-1, 1] (our sampler is the official one, without clipping).
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from vdm_common.config import ConfigError, ModelConfig, make_config, validate
from vdm_common.upstream import UpstreamError, UpstreamImport, checked_count, to_numpy
from vdm_common.weights import ConversionError, check_tensors, strip_wrapper_prefixes

PORT_CONFIG_FIELDS = {
    # field of the port's TrainConfig: what its value must be
    "embedding_dim": "an even integer",
    "n_blocks": "an integer >= 0",
    "n_attention_heads": "an integer >= 1",
    "dropout_prob": "a float in [0, 1)",
    "norm_groups": "an integer >= 1",
    "input_channels": "an integer >= 1",
    "use_fourier_features": "a boolean",
    "attention_everywhere": "a boolean",
    "batch_size": "an integer >= 1",
    "noise_schedule": "'fixed_linear' or 'learned_linear'",
    "gamma_min": "a float",
    "gamma_max": "a float",
    "antithetic_time_sampling": "a boolean",
    "lr": "a float",
    "weight_decay": "a float",
    "clip_grad_norm": "a boolean",
}
PORT_SCHEDULES = {"fixed_linear": "fixed", "learned_linear": "learnable_scalar"}
PORT_FOURIER = (5, 7)       # exponents 5 and 6
PORT_NORM_EPS = 1e-5        # torch.nn.GroupNorm's default
PORT_EMA_RATE = 0.9999


def _port_int(cfg: dict, field: str, source: str) -> int:
    value = cfg[field]
    # The port's TrainConfig types embedding_dim as float; its CLI stores ints. Accept integral floats.
    if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
        raise UpstreamError(f"{source}: {field} = {value!r} must be {PORT_CONFIG_FIELDS[field]}")
    return int(value)


def _port_bool(cfg: dict, field: str, source: str) -> bool:
    if not isinstance(cfg[field], bool):
        raise UpstreamError(f"{source}: {field} = {cfg[field]!r} must be a boolean")
    return cfg[field]


def _port_float(cfg: dict, field: str, source: str) -> float:
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UpstreamError(f"{source}: {field} = {value!r} must be {PORT_CONFIG_FIELDS[field]}")
    return float(value)


def _tensor_dict(obj: Any, source: str, what: str) -> dict[str, np.ndarray]:
    """{name: numeric numpy array} of a state dict read from a file; UpstreamError for anything else."""
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise UpstreamError(f"{source} {what} is not a state dict of named tensors (it is a {type(obj).__name__})")
    out = {}
    for key, value in obj.items():
        try:
            array = np.asarray(to_numpy(value))
        except (TypeError, ValueError, RuntimeError):    # ragged lists and the like
            array = None
        if array is None or array.dtype.kind not in "biuf":
            raise UpstreamError(f"{source} {what}: {key} is not a numeric tensor ({type(value).__name__} "
                                f"{value!r:.60})")
        out[key] = array
    return out


def check_port_config(cfg: Any, source: str) -> dict:
    """Checks a port config.yaml mapping: exactly the TrainConfig fields, with usable values."""
    if not isinstance(cfg, dict):
        raise UpstreamError(f"{source} holds a YAML {type(cfg).__name__}, not the port's TrainConfig mapping "
                            f"(fields {sorted(PORT_CONFIG_FIELDS)})")
    missing = sorted(set(PORT_CONFIG_FIELDS) - set(cfg))
    unknown = sorted(set(cfg) - set(PORT_CONFIG_FIELDS), key=str)
    if missing or unknown:
        raise UpstreamError(f"{source} is not the PyTorch port's config.yaml: "
                            + (f"missing fields {missing}" if missing else "")
                            + ("; " if missing and unknown else "")
                            + (f"unknown fields {unknown}" if unknown else "")
                            + f". Its TrainConfig has exactly {sorted(PORT_CONFIG_FIELDS)}.")
    if not isinstance(cfg["noise_schedule"], str) or cfg["noise_schedule"] not in PORT_SCHEDULES:
        raise UpstreamError(f"{source}: noise_schedule = {cfg['noise_schedule']!r} must be "
                            f"{PORT_CONFIG_FIELDS['noise_schedule']}")
    for f in ("embedding_dim", "n_blocks", "n_attention_heads", "norm_groups", "input_channels", "batch_size"):
        _port_int(cfg, f, source)
    for f in ("use_fourier_features", "attention_everywhere", "antithetic_time_sampling", "clip_grad_norm"):
        _port_bool(cfg, f, source)
    for f in ("dropout_prob", "gamma_min", "gamma_max", "lr", "weight_decay"):
        _port_float(cfg, f, source)
    return cfg


def port_model_config(cfg: dict, source: str = "config.yaml") -> ModelConfig:
    """Our ModelConfig computing exactly the port's function for its config.yaml mapping `cfg`."""
    check_port_config(cfg, source)
    fields = dict(
        vocab_size=256, image_channels=_port_int(cfg, "input_channels", source),
        antithetic_time_sampling=cfg["antithetic_time_sampling"],
        gamma_type=PORT_SCHEDULES[cfg["noise_schedule"]],
        gamma_min=_port_float(cfg, "gamma_min", source), gamma_max=_port_float(cfg, "gamma_max", source),
        sm_n_timesteps=0, sm_n_embd=_port_int(cfg, "embedding_dim", source),
        sm_n_layer=_port_int(cfg, "n_blocks", source), sm_pdrop=_port_float(cfg, "dropout_prob", source),
        with_fourier_features=cfg["use_fourier_features"], fourier_start=PORT_FOURIER[0],
        fourier_stop=PORT_FOURIER[1], fourier_order="frequency_major",
        with_attention=cfg["attention_everywhere"], attention_heads=_port_int(cfg, "n_attention_heads", source),
        norm_groups=_port_int(cfg, "norm_groups", source), norm_eps=PORT_NORM_EPS,
    )
    try:
        return ModelConfig.from_config(fields)
    except ConfigError as err:
        raise UpstreamError(f"{source}: the port's config maps to an unusable model config: {err}") from err


def port_config_sections(cfg: dict) -> dict:
    """The training / optimizer / data sections of our config that follow the port's recipe where ours can:
    its batch size, LR (constant: no warm-up), AdamW betas (0.9, 0.99), eps 1e-8 and weight decay, gradient
    clipping at 1.0 when it clipped, EMA 0.9999. Not reproduced: it decays every parameter (ours exempts
    biases, as the official trainer), ema_pytorch's warm-up of the EMA rate, its t0 ~ U[0, 1/B)."""
    return dict(
        training=dict(batch_size_train=int(cfg["batch_size"]), batch_size_eval=int(cfg["batch_size"])),
        optimizer=dict(learning_rate=float(cfg["lr"]), b1=0.9, b2=0.99, eps=1e-8,
                       weight_decay=float(cfg["weight_decay"]), num_steps_lr_warmup=0,
                       grad_clip_norm=1.0 if cfg["clip_grad_norm"] else 0.0, ema_rate=PORT_EMA_RATE),
        data=dict(dataset="cifar10"),
    )


def port_full_config(cfg: dict, source: str = "config.yaml", base=None):
    """The full validated config of an imported port run: the port's model, and the training sections of
    `port_config_sections`, or of `base` (a full ConfigDict) when given."""
    mc = port_model_config(cfg, source)
    if base is None:
        config = make_config(mc.to_dict(), **port_config_sections(cfg))
    else:
        config = ml_collections.ConfigDict(base.to_dict())
        config.model = ml_collections.ConfigDict(mc.to_dict())
    try:
        return validate(config)
    except ConfigError as err:
        raise UpstreamError(f"{source}: the port's training settings map to an unusable config: {err}") from err


def port_param_layout(cfg: dict, net2_index: int | None = None) -> "OrderedDict[str, tuple[int, ...]]":
    """{port state_dict key: shape} in the port's registration order (= its `parameters()` order, which
    indexes its optimizer state). net2_index: 3 when the model has a Dropout in net2 (dropout_prob > 0),
    else 2; by default from cfg."""
    E, C = int(cfg["embedding_dim"]), int(cfg["input_channels"])
    k = net2_index if net2_index is not None else (3 if float(cfg["dropout_prob"]) > 0.0 else 2)
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def resnet(prefix, cin, cout):
        out.update({f"{prefix}.net1.0.weight": (cin,), f"{prefix}.net1.0.bias": (cin,),
                    f"{prefix}.net1.2.weight": (cout, cin, 3, 3), f"{prefix}.net1.2.bias": (cout,),
                    f"{prefix}.cond_proj.weight": (cout, 4 * E),
                    f"{prefix}.net2.0.weight": (cout,), f"{prefix}.net2.0.bias": (cout,),
                    f"{prefix}.net2.{k}.weight": (cout, cout, 3, 3), f"{prefix}.net2.{k}.bias": (cout,)})
        if cin != cout:
            out.update({f"{prefix}.skip_conv.weight": (cout, cin, 1, 1), f"{prefix}.skip_conv.bias": (cout,)})

    def attn(prefix, c):
        out.update({f"{prefix}.layers.0.weight": (c,), f"{prefix}.layers.0.bias": (c,),
                    f"{prefix}.layers.1.weight": (3 * c, c, 1, 1), f"{prefix}.layers.1.bias": (3 * c,),
                    f"{prefix}.layers.3.weight": (c, c, 1, 1), f"{prefix}.layers.3.bias": (c,)})

    out.update({"model.embed_conditioning.0.weight": (4 * E, E), "model.embed_conditioning.0.bias": (4 * E,),
                "model.embed_conditioning.2.weight": (4 * E, 4 * E), "model.embed_conditioning.2.bias": (4 * E,)})
    n_freq = PORT_FOURIER[1] - PORT_FOURIER[0]
    c_in = C * (1 + 2 * n_freq) if cfg["use_fourier_features"] else C
    out.update({"model.conv_in.weight": (E, c_in, 3, 3), "model.conv_in.bias": (E,)})
    for i in range(int(cfg["n_blocks"])):
        resnet(f"model.down_blocks.{i}.resnet_block", E, E)
        if cfg["attention_everywhere"]:
            attn(f"model.down_blocks.{i}.attention_block", E)
    resnet("model.mid_resnet_block_1", E, E)
    attn("model.mid_attn_block", E)
    resnet("model.mid_resnet_block_2", E, E)
    for i in range(int(cfg["n_blocks"]) + 1):
        resnet(f"model.up_blocks.{i}.resnet_block", 2 * E, E)
        if cfg["attention_everywhere"]:
            attn(f"model.up_blocks.{i}.attention_block", E)
    out.update({"model.conv_out.0.weight": (E,), "model.conv_out.0.bias": (E,),
                "model.conv_out.2.weight": (C, E, 3, 3), "model.conv_out.2.bias": (C,)})
    if cfg["noise_schedule"] == "learned_linear":
        out.update({"gamma.b": (), "gamma.w": ()})
    return out


def _conv(w):                       # OIHW -> HWIO
    return np.transpose(w, (2, 3, 1, 0))


def _linear(w):                     # nn.Linear (out, in) -> Dense (in, out)
    return np.transpose(w, (1, 0))


def _conv1x1(w):                    # 1x1 conv (out, in, 1, 1) -> Dense (in, out)
    return np.transpose(w[:, :, 0, 0], (1, 0))


def _port_rules(cfg: dict, k: int) -> list[tuple[str, tuple[str, ...], Callable]]:
    """(neutral name, port keys used, f(*port arrays) -> neutral array), covering every parameter."""
    E = int(cfg["embedding_dim"])
    rules: list[tuple[str, tuple[str, ...], Callable]] = []

    def same(port, neutral, f=lambda a: a):
        rules.append((neutral, (port,), f))

    def norm(port, neutral):
        same(f"{port}.weight", f"{neutral}/scale")
        same(f"{port}.bias", f"{neutral}/bias")

    def conv(port, neutral, f=_conv):
        same(f"{port}.weight", f"{neutral}/kernel", f)
        same(f"{port}.bias", f"{neutral}/bias")

    def resnet(port, neutral, cin, cout):
        norm(f"{port}.net1.0", f"{neutral}/GroupNorm_0")
        conv(f"{port}.net1.2", f"{neutral}/conv1")
        same(f"{port}.cond_proj.weight", f"{neutral}/cond_proj/kernel", _linear)
        norm(f"{port}.net2.0", f"{neutral}/GroupNorm_1")
        conv(f"{port}.net2.{k}", f"{neutral}/conv2")
        if cin != cout:
            conv(f"{port}.skip_conv", f"{neutral}/nin_shortcut", _conv1x1)

    def attn(port, neutral):
        norm(f"{port}.layers.0", f"{neutral}/GroupNorm_0")
        # The fused conv's output channels are [q | k | v], each C wide (heads are contiguous inside each).
        for j, name in enumerate("qkv"):
            rules.append((f"{neutral}/{name}/kernel", (f"{port}.layers.1.weight",),
                          lambda w, j=j: _conv1x1(w[j * E:(j + 1) * E])))
            rules.append((f"{neutral}/{name}/bias", (f"{port}.layers.1.bias",), lambda b, j=j: b[j * E:(j + 1) * E]))
        conv(f"{port}.layers.3", f"{neutral}/proj_out", _conv1x1)

    # The port's first Linear sees the time embedding only; ours also sees the conditioning scalar (last
    # input row), which a zero row makes irrelevant.
    same("model.embed_conditioning.0.weight", "score_model/dense0/kernel",
         lambda w: np.concatenate([_linear(w), np.zeros((1, w.shape[0]), w.dtype)], axis=0))
    same("model.embed_conditioning.0.bias", "score_model/dense0/bias")
    same("model.embed_conditioning.2.weight", "score_model/dense1/kernel", _linear)
    same("model.embed_conditioning.2.bias", "score_model/dense1/bias")
    conv("model.conv_in", "score_model/conv_in")
    for i in range(int(cfg["n_blocks"])):
        resnet(f"model.down_blocks.{i}.resnet_block", f"score_model/down.block_{i}", E, E)
        if cfg["attention_everywhere"]:
            attn(f"model.down_blocks.{i}.attention_block", f"score_model/down.attn_{i}")
    resnet("model.mid_resnet_block_1", "score_model/mid.block_1", E, E)
    attn("model.mid_attn_block", "score_model/mid.attn_1")
    resnet("model.mid_resnet_block_2", "score_model/mid.block_2", E, E)
    for i in range(int(cfg["n_blocks"]) + 1):
        resnet(f"model.up_blocks.{i}.resnet_block", f"score_model/up.block_{i}", 2 * E, E)
        if cfg["attention_everywhere"]:
            attn(f"model.up_blocks.{i}.attention_block", f"score_model/up.attn_{i}")
    norm("model.conv_out.0", "score_model/GroupNorm_0")
    conv("model.conv_out.2", "score_model/conv_out")
    if cfg["noise_schedule"] == "learned_linear":
        same("gamma.w", "gamma/w", lambda a: np.reshape(a, (1,)))
        same("gamma.b", "gamma/b", lambda a: np.reshape(a, (1,)))
    return rules


def _net2_index(keys, source: str, what: str) -> int | None:
    found = {int(m.group(1)) for key in keys for m in [re.search(r"\.net2\.(\d+)\.weight$", key)] if m}
    found.discard(0)
    if len(found) > 1:
        raise UpstreamError(f"{source} {what}: resnet blocks mix net2 conv indices {sorted(found)}; one model "
                            f"has one (2 without dropout, 3 with)")
    return found.pop() if found else None


def check_port_tensors(state: Mapping[str, np.ndarray], cfg: dict, source: str, what: str) -> int:
    """Strict check of a port state dict (prefixes stripped) against the layout its config implies.
    Returns the net2 conv index. The message says when the net2 index contradicts dropout_prob."""
    k_cfg = 3 if float(cfg["dropout_prob"]) > 0.0 else 2
    k_found = _net2_index(state, source, what)
    expected = port_param_layout(cfg, k_cfg)
    try:
        check_tensors(state, expected, f"{source} {what}")
    except ConversionError as err:
        hint = ""
        if k_found is not None and k_found != k_cfg:
            hint = (f"\nIts resnet blocks keep their second conv at net2.{k_found}, which the port writes when "
                    f"dropout_prob {'> 0' if k_found == 3 else '== 0'}, but config.yaml says dropout_prob = "
                    f"{cfg['dropout_prob']}: the config.yaml does not belong to these weights.")
        raise UpstreamError(f"{err}{hint}\n(config.yaml: {', '.join(f'{f}={cfg[f]!r}' for f in sorted(cfg))})") \
            from err
    return k_cfg


def port_tensors_to_neutral(state: Mapping[str, np.ndarray], cfg: dict, source: str = "model.pt",
                            what: str = "model") -> dict[str, np.ndarray]:
    """A port state dict (numpy, any wrapper prefix) -> neutral params, every tensor used exactly once.

    Also maps the optimizer moments, which have the parameters' names and shapes."""
    state = strip_wrapper_prefixes(state)
    k = check_port_tensors(state, cfg, source, what)
    unused = set(state)
    out = {}
    for neutral, keys, f in _port_rules(cfg, k):
        out[neutral] = np.array(f(*(np.asarray(state[key]) for key in keys)), dtype=np.float32)
        unused -= set(keys)
    assert not unused, sorted(unused)            # check_port_tensors admits exactly the keys the rules use
    return out


def load_torch_checkpoint(path) -> Any:
    """torch.load of a port model.pt on the CPU, tensors only (weights_only): torch is imported here."""
    path = Path(path)
    try:
        import torch
    except ImportError as err:
        raise UpstreamError(f"reading {path} needs PyTorch: pip install torch (the CPU build will do)") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and unpickler errors all mean the same to the user
        head = path.read_bytes()[:1] if path.is_file() else b""
        hint = ("; it looks like a flax msgpack checkpoint: use --from-upstream=official"
                if head and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)) else "")
        first = str(err).splitlines()[0] if str(err) else ""
        raise UpstreamError(f"{path} cannot be read as a PyTorch checkpoint ({type(err).__name__}: {first}); "
                            f"the file is truncated, corrupt or of another format{hint}") from err


def find_port_files(path) -> tuple[Path, Path]:
    """(model.pt, config.yaml) of a port run directory or of its model.pt."""
    p = Path(path)
    if p.is_dir():
        model, config = p / "model.pt", p / "config.yaml"
        if not model.is_file():
            others = sorted(f.name for f in p.glob("*.pt"))
            raise UpstreamError(f"{p} has no model.pt" + (f" (found {others}: a model.tmp.*.pt is the previous "
                                                          f"checkpoint kept during an interrupted save; rename "
                                                          f"it to model.pt to import it)" if others else "")
                                + "; pass the port's results directory holding model.pt and config.yaml")
    elif p.is_file():
        model, config = p, p.parent / "config.yaml"
    else:
        raise UpstreamError(f"{p} does not exist; pass the port's results directory (model.pt + config.yaml)")
    if not config.is_file():
        raise UpstreamError(f"{config} is missing: the port writes config.yaml beside model.pt when a run "
                            f"starts, and the architecture cannot be read from model.pt alone. Restore it, or "
                            f"write it from the run's flags (fields {sorted(PORT_CONFIG_FIELDS)})")
    return model, config


def read_port_config(path) -> dict:
    import yaml

    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: undecodable bytes, bad dates
        raise UpstreamError(f"{path} is not valid YAML ({err})") from err
    return check_port_config(cfg, str(path))


def port_checkpoint_to_import(ckpt: Any, cfg: dict, source: str, config_source: str = "config.yaml",
                              base_config=None) -> UpstreamImport:
    """The dict a port run saves ({step, model, opt, ema}) -> UpstreamImport, strictly checked."""
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = sorted(ckpt, key=str)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UpstreamError(f"{source} is not a PyTorch-port checkpoint: it holds {keys}; the port saves a "
                            f"dict with 'step', 'model', 'opt' and 'ema'")
    unexpected = sorted(set(ckpt) - {"step", "model", "opt", "ema"}, key=str)
    if unexpected:
        raise UpstreamError(f"{source}: unexpected top-level entries {unexpected}; the port saves 'step', "
                            f"'model', 'opt' and 'ema'")
    config = port_full_config(cfg, config_source, base_config)
    report = [f"read {source} with {config_source}"]
    model_np = _tensor_dict(ckpt["model"], source, "['model']")
    params = port_tensors_to_neutral(model_np, cfg, source, "['model']")
    step = checked_count(ckpt.get("step", 0), "step", source)
    report.append(f"step {step}, {len(model_np)} port tensors -> {len(params)} parameters "
                  f"(net2 index {3 if float(cfg['dropout_prob']) > 0 else 2}, "
                  f"{int(cfg['n_attention_heads'])} attention head(s))")

    ema_params = _port_ema(ckpt.get("ema"), model_np, cfg, source, report)
    opt_mu, opt_nu, opt_count = _port_adam(ckpt.get("opt"), cfg, source, report)
    return UpstreamImport("pytorch-port", source, config, step, params, ema_params, opt_mu, opt_nu, opt_count,
                          report)


def _port_ema(ema, model_np: dict, cfg: dict, source: str, report: list) -> dict | None:
    """The EMA weights (ema_pytorch's `ema_model.` entries) in neutral form; its `online_model.` copy must
    equal `model`, and `initted` / `step` are its counters."""
    if ema is None or isinstance(ema, Mapping) and not ema:
        report.append("no EMA state in the file")
        return None
    ema = strip_wrapper_prefixes(_tensor_dict(ema, source, "['ema']"))
    ema_model = {k[len("ema_model."):]: to_numpy(v) for k, v in ema.items() if k.startswith("ema_model.")}
    online = {k[len("online_model."):]: to_numpy(v) for k, v in ema.items() if k.startswith("online_model.")}
    counters = {k: v for k, v in ema.items() if k in ("initted", "step")}
    other = sorted(set(ema) - {f"ema_model.{k}" for k in ema_model} - {f"online_model.{k}" for k in online}
                   - set(counters))
    if other:
        raise UpstreamError(f"{source} ['ema']: unexpected entries {other[:20]}; ema_pytorch saves ema_model.*, "
                            f"online_model.* (older versions), initted and step")
    if online:
        # ema_pytorch 0.1.x registers the online model too: a second copy of ['model'], nothing new.
        strip = strip_wrapper_prefixes(online)
        ref = strip_wrapper_prefixes(model_np)
        differ = sorted(k for k in set(strip) | set(ref)
                        if k not in strip or k not in ref or not np.array_equal(strip[k], ref[k]))
        if differ:
            raise UpstreamError(f"{source}: ['ema'] online_model.* differs from ['model'] at {differ[:10]}; the "
                                f"file mixes two runs")
    ema_params = port_tensors_to_neutral(ema_model, cfg, source, "['ema'] ema_model.*")
    ema_step = checked_count(counters["step"], "['ema'] step", source) if "step" in counters else None
    report.append(f"EMA weights from ['ema'] (ema_pytorch, {ema_step} updates)" if ema_step is not None
                  else "EMA weights from ['ema']")
    return ema_params


def _port_adam(opt, cfg: dict, source: str, report: list):
    """torch AdamW's exp_avg / exp_avg_sq in neutral form, matched to parameters by their order."""
    state = opt.get("state") if isinstance(opt, Mapping) else None
    if opt is None or isinstance(opt, Mapping) and (state is None or isinstance(state, Mapping) and not state):
        report.append("no optimizer moments: training continues with fresh AdamW moments")
        return None, None, 0
    groups = opt.get("param_groups") if isinstance(opt, Mapping) else None
    well_formed = (isinstance(opt, Mapping) and set(opt) == {"state", "param_groups"} and isinstance(state, Mapping)
                   and isinstance(groups, list)
                   and all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                           and all(isinstance(i, int) for i in g["params"]) for g in groups))
    if not well_formed:
        keys = sorted(opt, key=str) if isinstance(opt, Mapping) else type(opt).__name__
        raise UpstreamError(f"{source} ['opt'] is not a torch optimizer state_dict ({{'state': {{id: moments}}, "
                            f"'param_groups': [{{'params': [ids], ...}}]}}; it holds {keys})")
    layout = port_param_layout(cfg)
    ids = [i for group in groups for i in group["params"]]
    if len(ids) != len(layout):
        raise UpstreamError(f"{source} ['opt'] covers {len(ids)} parameters, the model has {len(layout)}; the "
                            f"optimizer belongs to another model")
    names = list(layout)
    missing = [names[n] for n, i in enumerate(ids) if i not in opt["state"]]
    if missing:
        raise UpstreamError(f"{source} ['opt'] has no Adam state for {len(missing)} parameters "
                            f"({missing[:5]}...); cannot continue its optimizer")
    for group in opt["param_groups"]:
        if group.get("amsgrad") is True:
            raise UpstreamError(f"{source} ['opt'] used AMSGrad, which this library's AdamW does not have")
    mu, nu, steps = {}, {}, set()
    for n, i in enumerate(ids):
        entry = _tensor_dict(opt["state"][i], source, f"['opt'] state of {names[n]}")
        if set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
            raise UpstreamError(f"{source} ['opt'] state of {names[n]} holds {sorted(entry)}; torch AdamW keeps "
                                f"step, exp_avg and exp_avg_sq")
        mu[names[n]], nu[names[n]] = entry["exp_avg"], entry["exp_avg_sq"]
        steps.add(checked_count(entry["step"], f"['opt'] step of {names[n]}", source))
    if len(steps) != 1:
        raise UpstreamError(f"{source} ['opt'] parameters are at different Adam steps {sorted(steps)[:5]}")
    count = steps.pop()
    opt_mu = port_tensors_to_neutral(mu, cfg, source, "['opt'] exp_avg")
    opt_nu = port_tensors_to_neutral(nu, cfg, source, "['opt'] exp_avg_sq")
    g = opt["param_groups"][0]
    report.append(f"AdamW moments from ['opt'] (update count {count}; lr {g.get('lr')}, betas {g.get('betas')}, "
                  f"eps {g.get('eps')}, weight decay {g.get('weight_decay')})")
    return opt_mu, opt_nu, count


def read_port(path, base_config=None) -> UpstreamImport:
    """Reads a PyTorch-port run (`path`: its results directory or its model.pt, with config.yaml beside)."""
    model_pt, config_yaml = find_port_files(path)
    cfg = read_port_config(config_yaml)
    ckpt = load_torch_checkpoint(model_pt)
    return port_checkpoint_to_import(ckpt, cfg, str(model_pt), str(config_yaml), base_config)
