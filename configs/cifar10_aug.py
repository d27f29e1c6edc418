"""The official VDM CIFAR-10 model trained with augmentation (eval 2.522 bits/dim): 320 channels,
dropout 0.05, batch 1024, flips and 90-degree rotations with the conditioning scalar marking them.

    python train_jax.py --config=configs/cifar10_aug.py --workdir=runs/cifar10_aug
"""
from vdm_common.config import make_config


def get_config():
    return make_config(
        model=dict(
            vocab_size=256, image_channels=3, gamma_type="learnable_scalar", gamma_min=-13.3, gamma_max=5.0,
            sm_n_timesteps=0, sm_n_embd=320, sm_n_layer=32, sm_pdrop=0.05,
            with_fourier_features=True, with_attention=False,
        ),
        training=dict(batch_size_train=1024, batch_size_eval=1024, substeps=10, steps_per_logging=1000,
                      steps_per_eval=10_000, steps_per_save=10_000, num_eval_batches=100),
        data=dict(dataset="cifar10_aug"),
    )
