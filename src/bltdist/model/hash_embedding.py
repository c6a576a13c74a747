"""Hash n-gram embeddings: every byte also looks up the hashes of the n-grams that end at it."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bltdist import kernels

# The primes of the BLT reference, in order; hash function f uses HASH_PRIMES[f % len(HASH_PRIMES)].
HASH_PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)


def ngram_hash(tokens: torch.Tensor, n: int, prime: int, table_size: int) -> torch.Tensor:
    """Hash of the n-gram ending at each position, modulo table_size.

    h(j) = sum_{i=0}^{n-1} x[j-n+1+i] * prime^i in int64 that wraps on overflow, with the
    sequence left-padded by n-1 zeros; then h mod table_size (non-negative, floor modulo).
    """
    tokens = tokens.long()
    padded = F.pad(tokens, (n - 1, 0))
    seq_len = tokens.shape[-1]
    hashes = torch.zeros_like(tokens)
    power = torch.ones((), dtype=torch.int64, device=tokens.device)
    for i in range(n):
        hashes = hashes + padded[..., i : i + seq_len] * power
        power = power * prime  # wraps modulo 2^64 like the reference's int64 arithmetic
    return torch.remainder(hashes, table_size)


class HashNgramEmbedding(nn.Module):
    """All (hash function, n) tables fused into one embedding; table t occupies rows [t*V, (t+1)*V).

    Tables are ordered function-major (t = f * len(ngram_sizes) + index of n), the layout of the
    Hugging Face port. The lookups of all tables are summed by one embedding_bag call, so no
    per-table (B, T, dim) output and only one dense table gradient are ever materialised.
    ``kernels`` (``auto``, ``triton``, ``torch``) picks the fused Triton kernel or this reference.
    """

    def __init__(self, ngram_sizes: list[int], num_functions: int, table_size: int, dim: int, kernels: str = "auto"):
        super().__init__()
        self.kernels = kernels
        self.ngram_sizes = list(ngram_sizes)
        self.num_functions = num_functions
        self.table_size = table_size
        self.weight = nn.Parameter(torch.empty(len(self.ngram_sizes) * num_functions * table_size, dim))

    @property
    def num_tables(self) -> int:
        return len(self.ngram_sizes) * self.num_functions

    def table_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Row of the fused table for every (position, table): (B, T, num_tables) int64."""
        with torch.no_grad():
            rows = []
            for function in range(self.num_functions):
                prime = HASH_PRIMES[function % len(HASH_PRIMES)]
                for n in self.ngram_sizes:
                    table = len(rows)
                    rows.append(ngram_hash(tokens, n, prime, self.table_size) + table * self.table_size)
            return torch.stack(rows, dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        fused = kernels.fused(
            self.kernels, "hash_ngram_embedding",
            tokens, self.weight, self.ngram_sizes, self.num_functions, self.table_size,
        )  # fmt: skip
        if fused is not None:
            return fused
        rows = self.table_rows(tokens)
        summed = F.embedding_bag(rows.flatten(0, 1), self.weight, mode="sum")
        return summed.unflatten(0, rows.shape[:2])
