"""Parallel dimensions of the trainer, one module each; the model itself stays plain PyTorch."""
