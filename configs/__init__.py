"""Config files shared by train_jax.py and train_torch.py (each defines get_config())."""
