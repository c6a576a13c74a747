"""bltdist: pretrain Byte Latent Transformers with 4D parallelism, PyTorch-native."""

__version__ = "0.1.0"
