"""bltdist: pretrain Byte Latent Transformers with 4D parallelism, PyTorch-native."""

from bltdist.model_dir import load_pretrained

__version__ = "0.1.0"
__all__ = ["load_pretrained"]
