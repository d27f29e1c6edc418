"""The UNet's shape described once (vdm_common.architecture) against the models and independent counts.

Parameter shapes: the official CIFAR-10 tree, and the real modules of both backends (the JAX init tree,
the torch state_dict through vdm_common.weights' naming table, in its registration order) over configs that
switch attention, Fourier features, channels, schedules and depth. FLOPs: a hand count of a tiny config,
and XLA's own count of the JAX forward. Activations: a hand count.
"""
from __future__ import annotations

import json
import pathlib
import re

import pytest

from vdm_common import architecture
from vdm_common import config as config_lib
from vdm_common.config import ModelConfig, load_config

DATA = pathlib.Path(__file__).resolve().parent / "data"
ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(sm_n_embd=8, norm_groups=4, sm_pdrop=0.0)
# Between them: attention on / off, Fourier features on / off (both orders), 1 and 3 channels, every
# schedule, 0 to 2 blocks each way.
SHAPE_CONFIGS = [
    dict(sm_n_layer=0, with_attention=False, image_channels=3, gamma_type="fixed"),
    dict(sm_n_layer=1, with_attention=True, attention_heads=2, with_fourier_features=False, image_channels=1,
         gamma_type="learnable_scalar"),
    dict(sm_n_layer=2, with_attention=True, fourier_start=5, fourier_stop=7, fourier_order="frequency_major",
         image_channels=3, gamma_type="learnable_nnet"),
    dict(sm_n_layer=1, with_attention=False, image_channels=1, gamma_type="learnable_nnet_endpoints"),
    dict(sm_n_layer=2, with_attention=False, with_fourier_features=False, image_channels=3,
         gamma_type="learnable_scalar"),
    dict(sm_n_layer=0, with_attention=True, image_channels=1, gamma_type="learnable_nnet"),
]


def model_config(**fields) -> ModelConfig:
    return ModelConfig.from_config({**SMALL, **fields})


# --------------------------------------------------------------------------------------- parameter shapes

def test_param_shapes_match_the_official_cifar10_tree():
    raw = json.loads((DATA / "official_vdm_cifar10_param_shapes.json").read_text())   # "['a']['b']": shape
    official_param_shapes = {"/".join(re.findall(r"\['([^']+)'\]", k)): tuple(v) for k, v in raw.items()}
    official = load_config(str(ROOT / "configs" / "cifar10.py"))
    assert architecture.model_param_shapes(ModelConfig.from_config(official.model)) == official_param_shapes


@pytest.mark.parametrize("fields", SHAPE_CONFIGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_param_shapes_match_both_backends(fields):
    jax = pytest.importorskip("jax")
    torch_vdm = pytest.importorskip("vdm_torch.vdm")
    jax_vdm = pytest.importorskip("vdm_jax.vdm")
    from vdm_common.weights import torch_layout_to_neutral

    mc = model_config(**fields)
    expected = architecture.model_param_shapes(mc)
    variables = jax.eval_shape(lambda k: jax_vdm.init_params(mc, k, (4, 4, mc.image_channels)), jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves_with_path(variables["params"])
    assert {"/".join(k.key for k in path): tuple(v.shape) for path, v in leaves} == expected
    state = {k: v.numpy() for k, v in torch_vdm.VDM(mc).state_dict().items()}
    assert [(k, v.shape) for k, v in torch_layout_to_neutral(state).items()] == list(expected.items())


# -------------------------------------------------------------------------------------------------- FLOPs

def test_forward_flops_by_hand():
    mc = model_config(sm_n_embd=4, sm_n_layer=1, norm_groups=2, image_channels=1, with_attention=True,
                      attention_heads=1, fourier_start=6, fourier_stop=8)
    # 2x2 image, P = 4 pixels, E = 4, C_in = 1 * (1 + 2 * 2 frequencies) = 5; 2 FLOPs per multiply-add:
    #   conditioning MLP: 2 * 5 * 16 + 2 * 16 * 16                             =   672
    #   conv_in 2 * 4 * 9 * 5 * 4, conv_out 2 * 4 * 9 * 4 * 1                    =  1728
    #   3 resnet blocks on E (1 down, 2 mid): 3 * (2 * 1152 + 2 * 16 * 4)       =  7296
    #   2 up blocks on 2E: 2 * (2304 + 1152 + 128 + shortcut 2 * 4 * 8 * 4)     =  7680
    #   4 attention blocks: 4 * (4 * 2 * 4 * 4 * 4 + QK^T, AV 2 * 2 * 4 * 4 * 4) =  3072
    assert architecture.unet_forward_flops(mc, (2, 2, 1)) == 20448
    assert architecture.train_step_flops(mc, (2, 2, 1), 5) == 3 * 5 * 20448
    assert architecture.sample_step_flops(mc, (2, 2, 1), 5) == 5 * 20448


@pytest.mark.parametrize("fields", [
    dict(sm_n_embd=64, sm_n_layer=1, norm_groups=8, with_attention=True, attention_heads=4, image_channels=3),
    dict(sm_n_embd=32, sm_n_layer=2, norm_groups=8, with_attention=False, with_fourier_features=False,
         image_channels=1),
], ids=["attention-fourier", "plain"])
def test_forward_flops_match_xla_cost_analysis(fields):
    """XLA's count of the JAX UNet forward (lowered, before optimisation) against ours. Two known
    differences: XLA counts a SAME conv's taps inside the image only, (3H - 2)(3W - 2) of the 9 HW, so our
    conv FLOPs are scaled by that here; and XLA also counts the element-wise work ours leaves out, which
    puts it 0 to 3% above ours for these widths (more for narrower UNets: 12% at 8 channels)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    from vdm_jax.unet import ScoreUNet

    mc = model_config(**fields)
    B, H, W, C = 2, 8, 6, mc.image_channels
    net, z, cond = ScoreUNet(mc), jnp.zeros((B, H, W, C)), jnp.zeros((B,))
    params = jax.eval_shape(lambda k: net.init(k, z, jnp.zeros(()), cond), jax.random.PRNGKey(0))
    cost = jax.jit(lambda p, z: net.apply(p, z, jnp.zeros(()), cond)).lower(params, z).cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / B
    inside = (3 * H - 2) * (3 * W - 2) / (9 * H * W)
    ours = sum(architecture.layer_flops(layer) * (inside if layer.kind == "conv3" else 1.0)
               for block in architecture.unet_blocks(mc, (H, W, C)) for layer in architecture.layers(block))
    assert 1.0 <= xla / ours <= 1.03


# ------------------------------------------------------------------------------------------- activations

def test_unet_activation_elements_by_hand():
    model = dict(sm_n_embd=4, sm_n_layer=1, norm_groups=2, image_channels=1, with_attention=True,
                 attention_heads=2, fourier_start=6, fourier_stop=8)
    mc = config_lib.ModelConfig(**model)
    # 2x2 image, P = 4 pixels, E = 4, per pixel:
    #   input 1 * (1 + 2 * 2 frequencies) = 5
    #   1 down + 2 mid resnet blocks (c = E):  3 * (3*4 + 4*4) = 84
    #   2 up resnet blocks (c = 2E, shortcut): 2 * (3*8 + 4*4 + 4) = 88
    #   attention: mid + 1 down + 2 up = 4 blocks * (6*4 + 2 heads * 4 pixels) = 128
    #   final norm + swish: 8
    assert architecture.unet_activation_elements(mc, (2, 2, 1)) == 4 * (5 + 84 + 88 + 128 + 8)
    assert architecture.unet_activation_elements(config_lib.make_config(model).model, (2, 2)) == 4 * 313
    # No Fourier features, no attention but the middle one (1 head), no down blocks:
    #   1 + 2 * 28 + 1 * 44 + (24 + 4) + 8 = 137 per pixel.
    plain = dict(model, sm_n_layer=0, with_attention=False, attention_heads=1, with_fourier_features=False)
    assert architecture.unet_activation_elements(plain, (2, 2, 1)) == 4 * 137
