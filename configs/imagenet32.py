"""ImageNet 32x32 (tfds `imagenet_resized/32x32`) with the CIFAR-10 model shape.

    python train_jax.py --config=configs/imagenet32.py --workdir=runs/imagenet32
"""
from vdm_common.config import make_config


def get_config():
    return make_config(
        model=dict(
            vocab_size=256, image_channels=3, gamma_type="learnable_scalar", gamma_min=-13.3, gamma_max=5.0,
            sm_n_timesteps=0, sm_n_embd=128, sm_n_layer=32, sm_pdrop=0.0,
            with_fourier_features=True, with_attention=False,
        ),
        training=dict(batch_size_train=512, batch_size_eval=512, substeps=100, steps_per_logging=1000,
                      steps_per_eval=10_000, steps_per_save=10_000, num_eval_batches=100),
        data=dict(dataset="imagenet32"),
    )
