"""Import of upstream checkpoints (vdm_common.upstream): the official clu release and the PyTorch port.

Official: checkpoint directories in clu's on-disk format, written from models of ours (by clu itself when
TensorFlow is installed; always also byte for byte the same .flax file through flax.serialization), read
back and evaluated in both backends.
PyTorch port: state dicts in the port's exact key layout (from the reference shapes file, both net2
variants), saved as the port saves them, imported, and checked against an independent computation of the
port's function written out below (fused qkv attention with q and k each scaled by d^-1/4 and heads as
contiguous channel blocks, frequency-major Fourier features, GroupNorm eps 1e-5, no conditioning input).
With VDM_PORT_PATH set to a checkout of addtt/variational-diffusion-models, the port's own modules are the
reference too.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import types
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import flax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from vdm_common import architecture, upstream  # noqa: E402
from vdm_common.config import ModelConfig  # noqa: E402
from vdm_common.types import Noise, bits_per_dim  # noqa: E402
from vdm_common.upstream import UpstreamError, official, port  # noqa: E402
from vdm_common.weights import flatten_tree, neutral_to_torch_layout, unflatten_tree  # noqa: E402
import vdm_jax.vdm as jvdm  # noqa: E402
import vdm_torch.vdm as tvdm  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent / "data"
HW, B = 8, 4


@pytest.fixture(scope="module", autouse=True)
def fast_tiny_models():
    """Tiny models: XLA's optimisation passes would dominate the JAX time, and torch's intra-op threads
    only contend on ops this small. The functions computed are the same. Restored after this module."""
    old = jax.config.read("jax_disable_most_optimizations"), torch.get_num_threads()
    jax.config.update("jax_disable_most_optimizations", True)
    torch.set_num_threads(1)
    yield
    jax.config.update("jax_disable_most_optimizations", old[0])
    torch.set_num_threads(old[1])


# ------------------------------------------------------------------------------------------- helpers

def normal(seed, shape, scale=1.0):
    return (scale * np.random.RandomState(seed).standard_normal(shape)).astype(np.float32)


def images_nhwc(seed=0, channels=3):
    return np.random.RandomState(seed).randint(0, 256, (B, HW, HW, channels)).astype(np.int32)


def noise_nhwc(seed=0, channels=3):
    rs = np.random.RandomState(seed)
    t = ((rs.uniform() + np.arange(B) / B) % 1.0).astype(np.float32)
    return (t, rs.standard_normal((B, HW, HW, channels)).astype(np.float32),
            rs.standard_normal((B, HW, HW, channels)).astype(np.float32))


@functools.lru_cache(maxsize=None)
def jitted_loss(mc: ModelConfig):
    return jax.jit(lambda params, images, noise: jvdm.VDM(mc).apply({"params": params}, images, jnp.zeros((B,)),
                                                                    noise))


def jax_terms(mc: ModelConfig, flat: dict, images, noise):
    params = jax.tree_util.tree_map(jnp.asarray, unflatten_tree(flat))
    terms = jitted_loss(mc)(params, jnp.asarray(images), jvdm.Noise(*(jnp.asarray(a) for a in noise)))
    return jax.tree_util.tree_map(np.asarray, terms)


def torch_model(mc: ModelConfig, flat: dict) -> tvdm.VDM:
    model = tvdm.VDM(mc)
    dtype = tvdm.float_dtype(mc)
    model.load_state_dict({k: torch.as_tensor(v, dtype=dtype) for k, v in neutral_to_torch_layout(flat).items()},
                          strict=True)
    return model.eval()


def torch_terms(mc: ModelConfig, flat: dict, images, noise):
    """Loss terms of our torch model; images and noise given NHWC, moved to NCHW here."""
    t, eps, eps_0 = noise
    dtype = tvdm.float_dtype(mc)
    nchw = lambda a, dt=dtype: torch.as_tensor(np.transpose(a, (0, 3, 1, 2)).copy()).to(dt)  # noqa: E731
    with torch.no_grad():
        terms = torch_model(mc, flat).loss_terms(
            nchw(images, torch.int64), torch.zeros(B, dtype=dtype),
            Noise(torch.as_tensor(t).to(dtype), nchw(eps), nchw(eps_0)))
    return type(terms)(*(x.numpy() for x in terms))


def total(terms):
    return np.asarray(terms.recon) + np.asarray(terms.klz) + np.asarray(terms.diff)


# ------------------------------------------------------------------------------------ the port's layout

def test_port_layout_matches_the_reference_state_dicts():
    for name, shapes in json.loads((DATA / "pytorch_port_state_dict_shapes.json").read_text()).items():
        layout = port.port_param_layout(port_cfg(name))
        assert list(layout.items()) == [(k, tuple(v)) for k, v in shapes.items()], name   # order too


# ------------------------------------------------------------------------------------ official (clu)

OFFICIAL_SMALL = dict(sm_n_embd=16, sm_n_layer=1, norm_groups=4, sm_pdrop=0.0, with_attention=True)


class OfficialTrainState(flax.struct.PyTreeNode):
    """The fields of the official TrainState; its two function fields are not pytree nodes (not saved)."""

    step: Any
    params: Any
    ema_params: Any
    opt_state: Any
    tx_fn: Any = flax.struct.field(pytree_node=False, default=None)
    apply_fn: Any = flax.struct.field(pytree_node=False, default=None)


def official_decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "bias", params)


def perturbed(tree, seed, scale=0.05, positive=False):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    out = [np.asarray(x) + normal(seed + i, np.shape(x), scale) for i, x in enumerate(leaves)]
    return treedef.unflatten([np.abs(x) if positive else x for x in out])


def official_state(mc: ModelConfig, step: int, seed: int = 0) -> OfficialTrainState:
    """A training state of our model laid out as the official one: random parameters of every shape our
    model has (GroupNorm scales near 1, gamma near its init), and optax.adamw with the bias mask, whose
    opt_state is (scale_by_adam {count, mu, nu}, masked {inner_state: {}}, {})."""
    flat = {}
    for i, (key, shape) in enumerate(sorted(architecture.model_param_shapes(mc).items())):
        flat[key] = normal(seed * 1000 + i, shape, 0.1 if len(shape) == 1 else 1.0 / math.sqrt(np.prod(shape[:-1])))
        if key.endswith("/scale"):
            flat[key] += 1.0
    if "gamma/w" in flat:
        flat["gamma/w"] += np.float32(mc.gamma_max - mc.gamma_min)
        flat["gamma/b"] += np.float32(mc.gamma_min)
    params = unflatten_tree(flat)
    opt_state = optax.adamw(1.0, mask=official_decay_mask).init(params)
    adam = opt_state[0]._replace(count=jnp.asarray(step, jnp.int32), mu=perturbed(opt_state[0].mu, seed + 200, 1e-3),
                                 nu=perturbed(opt_state[0].nu, seed + 300, 1e-6, positive=True))
    return OfficialTrainState(step=jnp.asarray(step, jnp.int32), params=params,
                              ema_params=perturbed(params, seed + 400, 0.01), opt_state=(adam,) + opt_state[1:])


def write_clu_layout(workdir: pathlib.Path, states: dict, latest: int | None = None) -> pathlib.Path:
    """What clu's MultihostCheckpoint(workdir/'checkpoints') writes on host 0, without TensorFlow:
    ckpt-N.flax = flax.serialization.to_bytes(state); ckpt-N.index / .data-00000-of-00001 hold TensorFlow's
    save counter (placeholders here, never read); `checkpoint` names the latest."""
    directory = workdir / "checkpoints-0"
    directory.mkdir(parents=True)
    for n, state in states.items():
        (directory / f"ckpt-{n}.flax").write_bytes(flax.serialization.to_bytes(state))
        (directory / f"ckpt-{n}.index").write_bytes(b"\0")
        (directory / f"ckpt-{n}.data-00000-of-00001").write_bytes(b"\0")
    latest = max(states) if latest is None else latest
    (directory / "checkpoint").write_text(
        f'model_checkpoint_path: "ckpt-{latest}"\n'
        + "".join(f'all_model_checkpoint_paths: "ckpt-{n}"\n' for n in sorted(states)))
    return directory


def check_official_import(imp, state: OfficialTrainState, mc: ModelConfig):
    """Bit-exact tensors, then the same loss as the original model in both backends."""
    sd = flax.serialization.to_state_dict(state)
    assert imp.step == int(state.step) and imp.opt_count == int(state.opt_state[0].count)
    for mine, theirs in ((imp.params, sd["params"]), (imp.ema_params, sd["ema_params"]),
                         (imp.opt_mu, sd["opt_state"]["0"]["mu"]), (imp.opt_nu, sd["opt_state"]["0"]["nu"])):
        theirs = flatten_tree(theirs)
        assert set(mine) == set(theirs)
        for k in theirs:
            np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)
    images, noise = images_nhwc(), noise_nhwc()
    reference = total(jax_terms(mc, flatten_tree(sd["ema_params"]), images, noise))
    np.testing.assert_array_equal(total(jax_terms(mc, imp.ema_params, images, noise)), reference)
    np.testing.assert_allclose(total(torch_terms(mc, imp.ema_params, images, noise)), reference, rtol=2e-5)


def test_official_import_reads_clu_layout_without_tensorflow(tmp_path):
    mc = ModelConfig.from_config(OFFICIAL_SMALL)
    states = {1: official_state(mc, 1000, seed=0), 2: official_state(mc, 2000, seed=1)}
    write_clu_layout(tmp_path, states)
    for path in (tmp_path, tmp_path / "checkpoints-0", tmp_path / "checkpoints-0" / "ckpt-2.flax"):
        imp = upstream.read_upstream("official", path, mc)                    # latest by default
        check_official_import(imp, states[2], mc)
    imp = upstream.read_upstream("official", tmp_path, mc, number=1)          # a named one
    check_official_import(imp, states[1], mc)
    assert imp.config.model.sm_n_embd == 16 and "ckpt-1" in imp.source
    assert imp.to_neutral().opt_count == 1000


def test_official_import_prefers_the_checkpoint_that_tensorflow_completed(tmp_path):
    mc = ModelConfig.from_config(OFFICIAL_SMALL)
    states = {1: official_state(mc, 10), 2: official_state(mc, 20, seed=3)}
    write_clu_layout(tmp_path, states, latest=1)          # ckpt-2.flax written, its TF part not committed
    imp = official.read_official(tmp_path, mc)
    assert imp.step == 10 and any("ckpt-1" in line for line in imp.report)


def test_official_import_with_clu_itself(tmp_path):
    pytest.importorskip("tensorflow")
    checkpoint = pytest.importorskip("clu.checkpoint")
    mc = ModelConfig.from_config(OFFICIAL_SMALL)
    ckpt = checkpoint.MultihostCheckpoint(str(tmp_path / "checkpoints"), host_id=0)
    states = [official_state(mc, 500, seed=5), official_state(mc, 700, seed=6)]
    for state in states:
        ckpt.save(state)
    assert sorted(p.name for p in (tmp_path / "checkpoints-0").glob("*.flax")) == ["ckpt-1.flax", "ckpt-2.flax"]
    check_official_import(official.read_official(tmp_path, mc), states[1], mc)
    # The file we write without TensorFlow is the one clu writes.
    assert (tmp_path / "checkpoints-0" / "ckpt-2.flax").read_bytes() == flax.serialization.to_bytes(states[1])


def test_official_import_errors_name_the_file_and_the_mismatch(tmp_path):
    mc = ModelConfig.from_config(OFFICIAL_SMALL)
    directory = write_clu_layout(tmp_path / "run", {3: official_state(mc, 30)})
    good = directory / "ckpt-3.flax"

    wider = dataclasses.replace(mc, sm_n_embd=32)
    with pytest.raises(UpstreamError) as err:
        official.read_official(directory, wider)
    text = str(err.value)
    assert str(good) in text and "mis-shaped" in text and "score_model/conv_in/kernel" in text
    assert "sm_n_embd=16" in text                       # what the tensors imply
    with pytest.raises(UpstreamError, match="missing"):
        official.read_official(directory, dataclasses.replace(mc, sm_n_layer=2))

    truncated = tmp_path / "truncated" / "ckpt-3.flax"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UpstreamError, match=f"{truncated}.*truncated, corrupt"):
        official.read_official(truncated, mc)

    foreign = tmp_path / "foreign" / "ckpt-1.flax"
    foreign.parent.mkdir()
    torch.save({"model": {}}, foreign)
    with pytest.raises(UpstreamError, match="zip archive.*pytorch-port"):
        official.read_official(foreign, mc)
    foreign.write_bytes(flax.serialization.msgpack_serialize({"weights": np.zeros(3)}))
    with pytest.raises(UpstreamError, match="not an official VDM TrainState"):
        official.read_official(foreign, mc)

    with pytest.raises(UpstreamError, match="no ckpt-7.flax; available: \\[3\\]"):
        official.read_official(directory, mc, number=7)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UpstreamError, match="no ckpt-N.flax files and no checkpoints-<host>/"):
        official.read_official(tmp_path / "empty", mc)
    with pytest.raises(UpstreamError, match="needs the model config"):
        upstream.read_upstream("official", directory)


# ---------------------------------------------------------------------------------- the PyTorch port

PORT_SHAPES = json.loads((DATA / "pytorch_port_state_dict_shapes.json").read_text())
PORT_A, PORT_B = list(PORT_SHAPES)    # fixed_linear without attention everywhere; learned_linear with it


def port_cfg(name: str, **changes) -> dict:
    """The config.yaml mapping of a reference model (name from the shapes file), with changes."""
    cfg = dict(embedding_dim=32, n_blocks=2, n_attention_heads=1, dropout_prob=0.0, norm_groups=8,
               input_channels=3, use_fourier_features=True,
               attention_everywhere="attention_everywhere True" in name, batch_size=128,
               noise_schedule="learned_linear" if "learned_linear" in name else "fixed_linear",
               gamma_min=-13.3, gamma_max=5.0, antithetic_time_sampling=True, lr=2e-4, weight_decay=0.01,
               clip_grad_norm=True)
    cfg.update(changes)
    return cfg


def port_state(name: str, net2: int, seed: int, fourier: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """Random tensors under the port's keys of a reference model, its second conv at net2.{net2}. Every
    tensor non-zero (the port zero-initialises some), GroupNorm scales near 1, a sane learned schedule."""
    rs = np.random.RandomState(seed)
    out = OrderedDict()
    for key, shape in PORT_SHAPES[name].items():
        key = key.replace(".net2.2.", f".net2.{net2}.")
        if key == "model.conv_in.weight" and not fourier:
            shape = [shape[0], 3, 3, 3]
        if key == "gamma.b":
            value = np.float32(-13.0 + 0.1 * rs.standard_normal())
        elif key == "gamma.w":
            value = np.float32(-18.0 + 0.1 * rs.standard_normal())    # used through |w|
        elif len(shape) == 1 and (".net1.0." in key or ".net2.0." in key or ".layers.0." in key
                                  or "conv_out.0." in key) and key.endswith("weight"):
            value = 1.0 + 0.1 * rs.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            value = rs.standard_normal(shape) / math.sqrt(fan_in) * (0.5 if len(shape) > 1 else 0.1)
        out[key] = torch.as_tensor(np.asarray(value, np.float32))
    return out


def adamw_state(model: dict, steps: int = 2, seed: int = 0) -> dict:
    """A real torch AdamW state_dict over parameters in the port's order, after `steps` updates."""
    params = [torch.nn.Parameter(v.clone()) for v in model.values()]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt.state_dict()


def write_port_run(directory: pathlib.Path, cfg: dict, model: dict, ema: dict | None = None, opt: dict | None = None,
                   step: int = 1234, online: bool = True) -> pathlib.Path:
    """A port results directory: model.pt as its trainer saves it (ema as ema_pytorch 0.1.4's state_dict:
    initted, step, online_model.* = the model, ema_model.*) and config.yaml."""
    directory.mkdir(parents=True, exist_ok=True)
    ema_sd = {"initted": torch.tensor([1.0]), "step": torch.tensor([step])}
    if online:
        ema_sd.update({f"online_model.{k}": v for k, v in model.items()})
    ema_sd.update({f"ema_model.{k}": v for k, v in (ema if ema is not None else model).items()})
    torch.save({"step": step, "model": model, "opt": opt if opt is not None else {"state": {}, "param_groups": []},
                "ema": ema_sd}, directory / "model.pt")
    (directory / "config.yaml").write_text(yaml.dump(cfg))
    return directory


# The port's function, written out from its description (independent of vdm_torch and of the import):
# NCHW, inputs k / 255 -> f = 2 (k + 1/2) / 256 - 1, no conditioning input.

def port_eps_hat(sd: dict, cfg: dict, z: torch.Tensor, g_t: torch.Tensor) -> torch.Tensor:
    E, groups, heads = cfg["embedding_dim"], cfg["norm_groups"], cfg["n_attention_heads"]
    k = 3 if cfg["dropout_prob"] > 0 else 2
    p = {key.removeprefix("model."): v.to(z.dtype) for key, v in sd.items()}
    t = (g_t - cfg["gamma_min"]) / (cfg["gamma_max"] - cfg["gamma_min"])
    half = E // 2
    freqs = torch.tensor([10000.0 ** (-i / (half - 1)) for i in range(half)], dtype=z.dtype)
    angles = (t * 1000.0)[:, None] * freqs[None, :]
    cond = torch.cat([angles.sin(), angles.cos()], dim=1)
    cond = F.silu(F.linear(cond, p["embed_conditioning.0.weight"], p["embed_conditioning.0.bias"]))
    cond = F.silu(F.linear(cond, p["embed_conditioning.2.weight"], p["embed_conditioning.2.bias"]))

    def gn(x, name):
        return F.group_norm(x, groups, p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)

    def resnet(x, name):
        h = F.conv2d(F.silu(gn(x, f"{name}.net1.0")), p[f"{name}.net1.2.weight"], p[f"{name}.net1.2.bias"], padding=1)
        h = h + F.linear(cond, p[f"{name}.cond_proj.weight"])[:, :, None, None]
        h = F.conv2d(F.silu(gn(h, f"{name}.net2.0")), p[f"{name}.net2.{k}.weight"], p[f"{name}.net2.{k}.bias"],
                     padding=1)
        if f"{name}.skip_conv.weight" in p:
            x = F.conv2d(x, p[f"{name}.skip_conv.weight"], p[f"{name}.skip_conv.bias"])
        return x + h

    def attention(x, name):
        Bn, C, H, W = x.shape
        qkv = F.conv2d(gn(x, f"{name}.layers.0"), p[f"{name}.layers.1.weight"], p[f"{name}.layers.1.bias"])
        d = C // heads
        outs = []
        for head in range(heads):                       # head j: channels [j d, (j + 1) d) of each of q, k, v
            q, k_, v = (qkv[:, part * C + head * d: part * C + (head + 1) * d].reshape(Bn, d, H * W)
                        for part in range(3))
            q, k_ = q * d ** -0.25, k_ * d ** -0.25
            weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k_), dim=-1)
            outs.append(torch.einsum("bts,bcs->bct", weights, v))
        h = torch.cat(outs, dim=1).reshape(Bn, C, H, W)
        return x + F.conv2d(h, p[f"{name}.layers.3.weight"], p[f"{name}.layers.3.bias"])

    h = z
    if cfg["use_fourier_features"]:
        # Frequency-major: [2^5 z_c0, 2^5 z_c1, 2^5 z_c2, 2^6 z_c0, ...] times 2 pi, then sin of all, cos of all.
        scaled = torch.cat([z * (2.0 ** n * 2 * math.pi) for n in (5, 6)], dim=1)
        h = torch.cat([z, scaled.sin(), scaled.cos()], dim=1)
    h = F.conv2d(h, p["conv_in.weight"], p["conv_in.bias"], padding=1)
    hs = [h]
    for i in range(cfg["n_blocks"]):
        h = resnet(h, f"down_blocks.{i}.resnet_block")
        if cfg["attention_everywhere"]:
            h = attention(h, f"down_blocks.{i}.attention_block")
        hs.append(h)
    h = resnet(h, "mid_resnet_block_1")
    h = attention(h, "mid_attn_block")
    h = resnet(h, "mid_resnet_block_2")
    for i in range(cfg["n_blocks"] + 1):
        h = resnet(torch.cat([h, hs.pop()], dim=1), f"up_blocks.{i}.resnet_block")
        if cfg["attention_everywhere"]:
            h = attention(h, f"up_blocks.{i}.attention_block")
    h = F.conv2d(F.silu(gn(h, "conv_out.0")), p["conv_out.2.weight"], p["conv_out.2.bias"], padding=1)
    return h + z


def port_loss_nats(sd: dict, cfg: dict, images, noise, dtype):
    """(recon, klz, diff) per example in nats of the port's VLB; images and noise given NHWC."""
    t, eps, eps_0 = (torch.as_tensor(a).to(dtype) for a in noise)
    eps, eps_0 = eps.permute(0, 3, 1, 2), eps_0.permute(0, 3, 1, 2)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).to(dtype)
    if cfg["noise_schedule"] == "learned_linear":
        b, w = sd["gamma.b"].to(dtype), sd["gamma.w"].to(dtype).abs()
    else:
        b = torch.tensor(cfg["gamma_min"], dtype=dtype)
        w = torch.tensor(cfg["gamma_max"] - cfg["gamma_min"], dtype=dtype)
    gamma = lambda s: b + w * s  # noqa: E731
    f = 2 * ((x + 0.5) / 256) - 1
    g_t = gamma(t)
    alpha, sigma = (torch.sqrt(torch.sigmoid(s * g_t))[:, None, None, None] for s in (-1.0, 1.0))
    z_t = alpha * f + sigma * eps
    diff = 0.5 * w * ((port_eps_hat(sd, cfg, z_t, g_t) - eps) ** 2).sum((1, 2, 3))
    var_1 = torch.sigmoid(gamma(torch.tensor(1.0, dtype=dtype)))
    klz = (0.5 * (var_1 + (1 - var_1) * f ** 2 - torch.log(var_1) - 1.0)).sum((1, 2, 3))
    g_0 = gamma(torch.tensor(0.0, dtype=dtype))
    z_0 = (f + torch.exp(0.5 * g_0) * eps_0)[..., None]
    values = torch.linspace(-(1 - 1 / 256), 1 - 1 / 256, 256, dtype=dtype)
    logp = torch.log_softmax(-0.5 * torch.exp(-g_0) * (z_0 - values) ** 2, dim=-1)
    recon = -torch.gather(logp, -1, x.long()[..., None]).sum((1, 2, 3, 4))
    return recon.detach().numpy(), klz.detach().numpy(), diff.detach().numpy()


PORT_CASES = {
    # name: (reference model, config changes, net2 index)
    "fixed-net2.2": (PORT_A, dict(), 2),
    "learned-attn-everywhere-dropout-net2.3-2heads": (PORT_B, dict(dropout_prob=0.1, n_attention_heads=2), 3),
    "learned-4heads-no-fourier-net2.2": (PORT_B, dict(n_attention_heads=4, use_fourier_features=False), 2),
}


@pytest.mark.parametrize("case", list(PORT_CASES), ids=list(PORT_CASES))
def test_port_import_computes_the_port_function(tmp_path, case):
    name, changes, net2 = PORT_CASES[case]
    cfg = port_cfg(name, **changes)
    model = port_state(name, net2, seed=1, fourier=cfg["use_fourier_features"])
    ema = port_state(name, net2, seed=2, fourier=cfg["use_fourier_features"])
    run = write_port_run(tmp_path / "run", cfg, model, ema, adamw_state(model), step=42)
    imp = upstream.read_upstream("pytorch-port", run)
    mc = imp.model_config
    assert (mc.fourier_start, mc.fourier_stop, mc.fourier_order) == (5, 7, "frequency_major")
    assert (mc.norm_eps, mc.norm_groups, mc.attention_heads, mc.sm_pdrop) == (
        1e-5, 8, cfg["n_attention_heads"], cfg["dropout_prob"])
    assert imp.step == 42 and imp.opt_count == 2

    images, noise = images_nhwc(3), noise_nhwc(4)
    for weights, port_sd in ((imp.params, model), (imp.ema_params, ema)):
        # Float64 end to end: the mapping is exact, so only float64 rounding remains.
        mc64 = dataclasses.replace(mc, compute_dtype="float64")
        ref64 = port_loss_nats(port_sd, cfg, images, noise, torch.float64)
        ours64 = torch_terms(mc64, weights, images, noise)
        for mine, theirs in zip(ours64, ref64):
            np.testing.assert_allclose(mine, theirs, rtol=1e-10)
        # Float32 bpd in both backends, against the port's function in float32.
        ref32 = bits_per_dim(types.SimpleNamespace(**{n: torch.as_tensor(v) for n, v in zip(
            ("recon", "klz", "diff"), port_loss_nats(port_sd, cfg, images, noise, torch.float32))}), (HW, HW, 3))
        for terms in (torch_terms(mc, weights, images, noise), jax_terms(mc, weights, images, noise)):
            bpd = bits_per_dim(type(terms)(*(torch.as_tensor(np.asarray(x)) for x in terms)), (HW, HW, 3))
            np.testing.assert_allclose(float(bpd["bpd"]), float(ref32["bpd"]), rtol=2e-6)


def test_port_import_maps_each_tensor_as_written(tmp_path):
    """The layout rules one by one, on the first reference model with attention everywhere and 2 heads."""
    cfg = port_cfg(PORT_B, n_attention_heads=2)
    model = port_state(PORT_B, 2, seed=7)
    opt = adamw_state(model, steps=3)
    imp = port.read_port(write_port_run(tmp_path / "run", cfg, model, opt=opt))
    n = lambda key: model[key].numpy()  # noqa: E731
    C = 32
    qkv = n("model.mid_attn_block.layers.1.weight")[:, :, 0, 0]                     # (3C, C): rows q | k | v
    for j, part in enumerate("qkv"):
        np.testing.assert_array_equal(imp.params[f"score_model/mid.attn_1/{part}/kernel"], qkv[j * C:(j + 1) * C].T)
        np.testing.assert_array_equal(imp.params[f"score_model/mid.attn_1/{part}/bias"],
                                      n("model.mid_attn_block.layers.1.bias")[j * C:(j + 1) * C])
    np.testing.assert_array_equal(imp.params["score_model/up.attn_2/proj_out/kernel"],
                                  n("model.up_blocks.2.attention_block.layers.3.weight")[:, :, 0, 0].T)
    dense0 = imp.params["score_model/dense0/kernel"]
    assert dense0.shape == (33, 128) and not dense0[32].any()                        # the conditioning row
    np.testing.assert_array_equal(dense0[:32], n("model.embed_conditioning.0.weight").T)
    np.testing.assert_array_equal(imp.params["score_model/down.block_1/conv2/kernel"],
                                  n("model.down_blocks.1.resnet_block.net2.2.weight").transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(imp.params["score_model/up.block_0/nin_shortcut/kernel"],
                                  n("model.up_blocks.0.resnet_block.skip_conv.weight")[:, :, 0, 0].T)
    np.testing.assert_array_equal(imp.params["score_model/GroupNorm_0/scale"], n("model.conv_out.0.weight"))
    np.testing.assert_array_equal(imp.params["score_model/mid.block_2/cond_proj/kernel"],
                                  n("model.mid_resnet_block_2.cond_proj.weight").T)
    assert imp.params["gamma/w"].shape == (1,) and imp.params["gamma/w"][0] == n("gamma.w")
    # The moments follow the parameters (matched by the port's parameter order) through the same rules.
    order = list(model)
    mu_q = opt["state"][order.index("model.mid_attn_block.layers.1.weight")]["exp_avg"].numpy()[:, :, 0, 0]
    np.testing.assert_array_equal(imp.opt_mu["score_model/mid.attn_1/k/kernel"], mu_q[C:2 * C].T)
    nu_b = opt["state"][order.index("gamma.b")]["exp_avg_sq"].numpy()
    np.testing.assert_array_equal(imp.opt_nu["gamma/b"], nu_b.reshape(1))
    assert not imp.opt_mu["score_model/dense0/kernel"][32].any()
    assert imp.opt_count == 3 and imp.ema_params.keys() == imp.params.keys()


def test_port_import_to_neutral_file(tmp_path):
    from vdm_common.neutral import load_neutral

    cfg = port_cfg(PORT_A)
    model = port_state(PORT_A, 2, seed=3)
    imp = port.read_port(write_port_run(tmp_path / "run", cfg, model, online=False, step=9))
    assert imp.opt_mu is None and "fresh AdamW moments" in imp.summary()
    path = upstream.write_neutral(imp, tmp_path / "port.safetensors")
    back = load_neutral(path)
    assert back.model_config == imp.model_config and back.step == 9 and back.opt_mu is None
    assert json.loads(back.extra["config"])["optimizer"]["grad_clip_norm"] == 1.0
    for k, v in imp.params.items():
        np.testing.assert_array_equal(back.params[k], v)


def test_port_import_errors_name_the_file_and_the_mismatch(tmp_path):
    cfg = port_cfg(PORT_A)
    model = port_state(PORT_A, 2, seed=0)
    run = write_port_run(tmp_path / "run", cfg, model)

    wrong = write_port_run(tmp_path / "wider", port_cfg(PORT_A, embedding_dim=64), model)
    with pytest.raises(UpstreamError) as err:
        port.read_port(wrong)
    text = str(err.value)
    assert str(wrong / "model.pt") in text and "mis-shaped" in text and "model.conv_in.weight" in text

    dropout = write_port_run(tmp_path / "dropout", port_cfg(PORT_A, dropout_prob=0.1), model)
    with pytest.raises(UpstreamError, match="net2.2.*dropout_prob = 0.1"):
        port.read_port(dropout)

    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.pt").write_bytes((run / "model.pt").read_bytes())
    with pytest.raises(UpstreamError, match=f"{tmp_path / 'noconfig' / 'config.yaml'} is missing"):
        port.read_port(tmp_path / "noconfig")

    corrupt = write_port_run(tmp_path / "corrupt", cfg, model)
    data = (corrupt / "model.pt").read_bytes()
    (corrupt / "model.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(UpstreamError, match=f"{corrupt / 'model.pt'} cannot be read as a PyTorch checkpoint"):
        port.read_port(corrupt)

    (corrupt / "model.pt").write_bytes(flax.serialization.msgpack_serialize({"step": 1, "params": {}}))
    with pytest.raises(UpstreamError, match="flax msgpack checkpoint: use --from-upstream=official"):
        port.read_port(corrupt)

    torch.save({"weights": model}, corrupt / "model.pt")
    with pytest.raises(UpstreamError, match="not a PyTorch-port checkpoint"):
        port.read_port(corrupt)

    extra = write_port_run(tmp_path / "extra", dict(cfg, ema_decay=0.999), model)
    with pytest.raises(UpstreamError, match="unknown fields \\['ema_decay'\\]"):
        port.read_port(extra)
    (extra / "config.yaml").write_text("- not a mapping\n")
    with pytest.raises(UpstreamError, match="config.yaml holds a YAML list"):
        port.read_port(extra)

    mixed = dict(model)
    torch.save({"step": 1, "model": model, "opt": {"state": {}, "param_groups": []},
                "ema": {"online_model." + k: v + 1 for k, v in mixed.items()}}, run / "model.pt")
    with pytest.raises(UpstreamError, match="online_model.* differs from \\['model'\\]"):
        port.read_port(run)

    missing_key = OrderedDict(model)
    del missing_key["model.mid_attn_block.layers.1.bias"]
    missing_key["model.extra.weight"] = torch.zeros(3)
    write_port_run(run, cfg, missing_key)
    with pytest.raises(UpstreamError) as err:
        port.read_port(run)
    assert "missing (1)" in str(err.value) and "model.mid_attn_block.layers.1.bias" in str(err.value)
    assert "unexpected (1)" in str(err.value) and "model.extra.weight" in str(err.value)


def test_port_import_accepts_wrapper_prefixes(tmp_path):
    cfg = port_cfg(PORT_A)
    model = port_state(PORT_A, 2, seed=4)
    wrapped = OrderedDict((f"module._orig_mod.{k}", v) for k, v in model.items())
    imp = port.read_port(write_port_run(tmp_path / "run", cfg, wrapped, ema=model, online=False))
    for k, v in port.read_port(write_port_run(tmp_path / "plain", cfg, model)).params.items():
        np.testing.assert_array_equal(imp.params[k], v)


def test_imports_load_into_both_trainers(tmp_path):
    """An import with AdamW moments becomes a TrainState of each backend (vdm_*.convert.state_from_neutral,
    what a run directory is made of), with its step, Adam count and moments, and the port's recipe."""
    jconvert = pytest.importorskip("vdm_jax.convert")
    tconvert = pytest.importorskip("vdm_torch.convert")
    cfg = port_cfg(PORT_B, n_attention_heads=2)
    model = port_state(PORT_B, 2, seed=11)
    imp = port.read_port(write_port_run(tmp_path / "run", cfg, model, port_state(PORT_B, 2, seed=12),
                                            adamw_state(model, steps=4), step=4))
    ckpt = imp.to_neutral()
    opt = imp.config.optimizer
    assert (opt.grad_clip_norm, opt.num_steps_lr_warmup, opt.learning_rate) == (1.0, 0, 2e-4)
    jstate = jconvert.state_from_neutral(ckpt, opt)
    tstate = tconvert.state_from_neutral(ckpt, opt)
    assert int(jstate.step) == tstate.step == 4
    assert int(jconvert.adam_state(jstate.opt_state).count) == 4
    np.testing.assert_array_equal(np.asarray(jconvert.adam_state(jstate.opt_state).mu["gamma"]["b"]),
                                  imp.opt_mu["gamma/b"])

    for name, p in tstate.model.named_parameters():          # moments set by parameter name
        if name == "score_model.mid.attn_1.q.weight":
            np.testing.assert_array_equal(tstate.optimizer.state[p]["exp_avg"].numpy(),
                                          imp.opt_mu["score_model/mid.attn_1/q/kernel"].T)


# ----------------------------------------------------------------------- against the port's own code

def load_port_modules(path: pathlib.Path, monkeypatch):
    """The port's vdm_unet.py and vdm.py from a checkout. Its utils.py pulls accelerate, torchinfo and
    torchvision; when those are missing a stand-in provides the three helpers the model files import.
    Everything is registered in sys.modules for this test only."""
    def load(name, file):
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    try:
        load("utils", path / "utils.py")
    except (ImportError, OSError):
        stub = types.ModuleType("utils")

        def zero_init(module):
            with torch.no_grad():
                for p in module.parameters():
                    p.zero_()
            return module
        stub.zero_init = zero_init
        stub.maybe_unpack_batch = lambda batch: batch if isinstance(batch, (tuple, list)) and len(batch) == 2 \
            else (batch, None)
        stub.unsqueeze_right = lambda x, num_dims=1: x.view(x.shape + (1,) * num_dims)
        monkeypatch.setitem(sys.modules, "utils", stub)
    return load("port_vdm_unet", path / "vdm_unet.py"), load("port_vdm", path / "vdm.py")


@pytest.mark.skipif(not os.environ.get("VDM_PORT_PATH"),
                    reason="set VDM_PORT_PATH to a checkout of addtt/variational-diffusion-models")
@pytest.mark.parametrize("dropout,heads,everywhere,schedule", [(0.0, 1, False, "learned_linear"),
                                                               (0.1, 2, True, "fixed_linear")])
def test_port_import_matches_the_port_code(tmp_path, monkeypatch, dropout, heads, everywhere, schedule):
    port_unet, port_vdm = load_port_modules(pathlib.Path(os.environ["VDM_PORT_PATH"]), monkeypatch)
    cfg = port_cfg(PORT_A, dropout_prob=dropout, n_attention_heads=heads, attention_everywhere=everywhere,
                   noise_schedule=schedule)
    torch.manual_seed(0)
    diffusion = port_vdm.VDM(port_unet.UNetVDM(types.SimpleNamespace(**cfg)), types.SimpleNamespace(**cfg),
                             image_shape=(3, HW, HW))
    with torch.no_grad():
        for name, p in diffusion.named_parameters():              # every tensor non-zero, schedule kept sane
            if not name.startswith("gamma."):
                p.add_(0.05 * torch.randn(p.shape))
    diffusion.eval()
    write_port_run(tmp_path / "run", cfg, diffusion.state_dict(), step=5)
    imp = port.read_port(tmp_path / "run")

    images, (t, eps, eps_0) = images_nhwc(5), noise_nhwc(6)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    nchw = lambda a: torch.as_tensor(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    monkeypatch.setattr(diffusion, "sample_times", lambda batch_size: torch.as_tensor(t).clone())
    monkeypatch.setattr(torch, "randn_like", lambda like: nchw(eps_0).clone())   # the decoder's eps_0
    with torch.no_grad():
        port_bpd, _ = diffusion(x, noise=nchw(eps))
    for terms in (torch_terms(imp.model_config, imp.params, images, (t, eps, eps_0)),
                  jax_terms(imp.model_config, imp.params, images, (t, eps, eps_0))):
        bpd = float(np.mean(total(terms))) / (HW * HW * 3 * math.log(2.0))
        np.testing.assert_allclose(bpd, float(port_bpd), rtol=2e-6)


def test_imported_run_directory_evaluates_and_trains_in_both_backends(tmp_path):
    """convert.py --from-upstream writes a run directory; each trainer evaluates its EMA weights (the same
    bpd: both draw the eval noise from the same seed, vdm_common.noise, so they agree to float32 rounding,
    the parity suite's bpd tolerance) and continues training from the imported step with the stored config."""
    pytest.importorskip("jax")
    from tests.conftest import run_mode
    import convert as convert_cli

    cfg = port_cfg(PORT_B, input_channels=1, embedding_dim=16, n_blocks=1, norm_groups=4)
    rs = np.random.RandomState(3)
    model = OrderedDict()
    for key, shape in port.port_param_layout(cfg).items():     # small random weights, schedule kept sane
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = rs.standard_normal(shape) / math.sqrt(fan_in) * 0.3 if len(shape) > 1 else 1.0 + 0.1 * rs.randn(*shape)
        model[key] = torch.as_tensor(np.asarray(value, np.float32))
    if "gamma.b" in model:
        model["gamma.b"], model["gamma.w"] = torch.tensor(-8.0), torch.tensor(14.0)
    src = write_port_run(tmp_path / "port", cfg, model, opt=adamw_state(model), step=7)
    run_dir = tmp_path / "imported"
    assert convert_cli.main(["--from-upstream=pytorch-port", f"--from={src}", f"--to={run_dir}"]) == 0
    # The port's data set is CIFAR-10; evaluate on digits-sized npz data of its shape instead.
    rs = np.random.RandomState(0)
    npz = tmp_path / "data.npz"
    np.savez(npz, train=rs.randint(0, 256, (64, 8, 8, 1)).astype(np.uint8),
             test=rs.randint(0, 256, (40, 8, 8, 1)).astype(np.uint8))
    overrides = {"training.batch_size_eval": 20,
                 "training.eval_noise_samples": 4}
    stored = json.loads((run_dir / "config.json").read_text())
    stored["data"].update(dataset="npz", npz_path=str(npz))
    stored["training"].update(batch_size_train=8, num_steps_train=9, substeps=1, steps_per_logging=1,
                              steps_per_eval=9, steps_per_save=1, steps_per_sample=0)
    (run_dir / "config.json").write_text(json.dumps(stored))
    results = [run_mode(backend, None, run_dir, "eval", overrides) for backend in ("jax", "torch")]
    assert results[0]["step"] == results[1]["step"] == 7
    np.testing.assert_allclose(results[0]["bpd"], results[1]["bpd"], rtol=1e-5)
    trained = run_mode("torch", None, run_dir)
    assert trained["step"] == 9
