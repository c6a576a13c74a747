from setuptools import setup

setup(
    name="bltdist",
    version="0.1.0",
    description="PyTorch-native 4D-parallel pretraining of Byte Latent Transformers",
    python_requires=">=3.10",
    package_dir={"bltdist": "src/bltdist", "bltdist.kernels": "kernels"},
    packages=[
        "bltdist",
        "bltdist.model",
        "bltdist.patching",
        "bltdist.data",
        "bltdist.parallel",
        "bltdist.parallel.context",
        "bltdist.parallel.pipeline",
        "bltdist.training",
        "bltdist.kernels",
    ],
    install_requires=[
        "torch>=2.11",
        "pyyaml",
        "safetensors",
        "tokenizers",  # the BPE baseline's tokenizer (model.arch: tokenlm)
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": ["pytest", "transformers>=5", "pyarrow", "matplotlib", "zstandard"],
        "parquet": ["pyarrow"],
        "scaling": ["matplotlib"],  # python -m bltdist.scaling's plot
        "zstd": ["zstandard"],
        "flash": ["flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "bltdist-train=bltdist.train:main",
            "bltdist-convert=bltdist.convert:main",
            "bltdist-patch=bltdist.patching.cli:main",
            "bltdist-data=bltdist.data.cli:main",
            "bltdist-generate=bltdist.generate:main",
            "bltdist-evaluate=bltdist.evaluate:main",
            "bltdist-scaling=bltdist.scaling:main",
        ]
    },
)
