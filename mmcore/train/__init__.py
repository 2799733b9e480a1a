"""Training: DeepSpeed config, Ray Train worker loop, atomic checkpoints, fit()."""
