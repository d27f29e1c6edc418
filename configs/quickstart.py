"""Quickstart: a small VDM on scikit-learn's 8x8 digits (17 grey levels), minutes on a laptop CPU.

    python train_jax.py                     # same as --config=configs/quickstart.py --workdir=runs/quickstart_jax
    python train_torch.py                   # the same run in PyTorch

The digits have 17 levels, so their bins are 15 times wider than CIFAR-10's: gamma_min is raised to
suit that grid (with -13.3 a small model spends most of its capacity on invisible noise levels).
"""
from vdm_common.config import make_config


def get_config():
    return make_config(
        model=dict(
            vocab_size=17, image_channels=1, gamma_type="learnable_scalar", gamma_min=-8.0, gamma_max=6.0,
            sm_n_timesteps=0, sm_n_embd=32, sm_n_layer=2, sm_pdrop=0.0, norm_groups=8,
            with_fourier_features=True, with_attention=False,
        ),
        training=dict(num_steps_train=2000, batch_size_train=64, batch_size_eval=256, substeps=50,
                      steps_per_logging=100, steps_per_eval=500, steps_per_save=500, steps_per_sample=1000,
                      num_eval_batches=0, sample_steps=100, num_samples=64),
        optimizer=dict(learning_rate=2e-3, num_steps_lr_warmup=100, ema_rate=0.99, grad_clip_norm=1.0),
        data=dict(dataset="digits"),
    )
