"""The official VDM CIFAR-10 model and training recipe (eval 2.637 bits/dim after 10M steps).

    python train_jax.py --config=configs/cifar10.py --workdir=runs/cifar10
    python train_jax.py --config=configs/cifar10.py --config.training.batch_size_train=64 ...
"""
from vdm_common.config import make_config


def get_config():
    return make_config(
        model=dict(
            vocab_size=256, image_channels=3, gamma_type="learnable_scalar", gamma_min=-13.3, gamma_max=5.0,
            sm_n_timesteps=0, sm_n_embd=128, sm_n_layer=32, sm_pdrop=0.1,
            with_fourier_features=True, with_attention=False,
        ),
        training=dict(batch_size_train=128, batch_size_eval=128, substeps=1000, steps_per_logging=1000,
                      steps_per_eval=10_000, steps_per_save=100_000, num_eval_batches=100),
        data=dict(dataset="cifar10"),
    )
