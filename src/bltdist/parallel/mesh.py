"""The device mesh: the one source of truth for ranks.

Dimensions, outer to inner: pp, dp_replicate, dp_shard, cp, tp (torchtitan's order: tensor
parallel innermost so that its frequent collectives stay inside a node). Every dimension exists,
size 1 included, so code can always ask ``mesh["tp"]``. Flattened views used by the trainer:

- ``dp``: dp_replicate x dp_shard, the ranks that read different data;
- ``dp_shard_cp``: dp_shard x cp, the ranks FSDP shards parameters over (context-parallel ranks
  hold different bytes of the same sequences, so they too average gradients);
- ``fsdp``: what FSDP2 gets: dp_shard_cp, or (dp_replicate, dp_shard_cp) for HSDP.

``check_layout`` runs before any process group exists and reports every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from bltdist.config import Config, data_parallel_size
from bltdist.errors import ConfigError
from bltdist.parallel.context import check_context_layout
from bltdist.parallel.pipeline import check_pipeline_layout

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> ParallelDims:
        parallel = cfg.parallel
        dp_shard = data_parallel_size(cfg, world_size) // parallel.dp_replicate
        return cls(parallel.pp, parallel.dp_replicate, dp_shard, parallel.cp, parallel.tp)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp

    @property
    def uses_fsdp(self) -> bool:
        return self.dp_cp > 1

    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_DIMS)


def check_layout(cfg: Config, world_size: int) -> None:
    """ConfigError naming every way the parallel layout does not fit the world size or the model."""
    data_parallel_size(cfg, world_size)  # the product of degrees and the batch split
    parallel, blt = cfg.parallel, cfg.model.blt
    problems = []
    if parallel.tp > 1:
        if cfg.model.arch != "blt":
            problems.append("parallel.tp: tensor parallelism is implemented for model.arch blt only; set parallel.tp: 1")
        for key in ("global_heads", "global_kv_heads", "local_heads", "local_kv_heads"):
            heads = getattr(blt, key) or getattr(blt, key.replace("kv_", ""))
            if heads % parallel.tp:
                problems.append(
                    f"parallel.tp: {parallel.tp} must divide model.blt.{key} ({heads}); "
                    "each tensor-parallel rank holds whole attention heads"
                )
        for key in ("encoder_ffn_dim", "decoder_ffn_dim", "global_ffn_dim"):
            width = getattr(blt, key) or int(8 * (blt.global_dim if key == "global_ffn_dim" else blt.local_dim) / 3)
            if width % parallel.tp:
                problems.append(f"parallel.tp: {parallel.tp} must divide the FFN width model.blt.{key} ({width})")
    for check in (check_context_layout, check_pipeline_layout):
        try:
            check(cfg)
        except ConfigError as error:
            problems += error.problems
    if problems:
        raise ConfigError(problems)


@dataclass
class Meshes:
    """The 5-D mesh and the flattened views the trainer uses, kept here because PyTorch >= 2.11
    wants flattened dimensions bookkept by their user rather than sliced from the root again."""

    root: DeviceMesh
    dp: DeviceMesh
    dp_shard_cp: DeviceMesh
    fsdp: DeviceMesh  # 1-D (dp_shard x cp) for FSDP, 2-D (dp_replicate, dp_shard x cp) for HSDP

    def __getitem__(self, name: str) -> DeviceMesh:
        """One of the five named dimensions."""
        return self.root[name]


def build_mesh(dims: ParallelDims, device_type: str) -> Meshes:
    """The 5-D mesh over the default process group, with the flattened views named above."""
    root = init_device_mesh(device_type, dims.sizes(), mesh_dim_names=MESH_DIMS)
    dp = root["dp_replicate", "dp_shard"]._flatten("dp")
    dp_shard_cp = root["dp_shard", "cp"]._flatten("dp_shard_cp")
    fsdp = root["dp_replicate", "dp_shard_cp"] if dims.dp_replicate > 1 else dp_shard_cp
    return Meshes(root=root, dp=dp, dp_shard_cp=dp_shard_cp, fsdp=fsdp)
