"""The parallel layout: degrees, every check of them, and the device mesh (the one source of truth for ranks).

Dimensions, outer to inner: pp, dp_replicate, dp_shard, cp, tp (torchtitan's order: tensor
parallel innermost so that its frequent collectives stay inside a node). Every dimension exists,
size 1 included, so code can always ask ``mesh["tp"]``. Flattened views used by the trainer:

- ``dp``: dp_replicate x dp_shard, the ranks that read different data;
- ``dp_shard_cp``: dp_shard x cp, the ranks FSDP shards parameters over (context-parallel ranks
  hold different bytes of the same sequences, so they too average gradients);
- ``fsdp``: what FSDP2 gets: dp_shard_cp, or (dp_replicate, dp_shard_cp) for HSDP.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from bltdist.config import Config, ParallelConfig
from bltdist.errors import ConfigError
from bltdist.model.blt import default_ffn_dim
from bltdist.model.super_patch import SUPER_PATCH_ROW_MULTIPLE

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
PIPELINE_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble")
V_SHAPED_SCHEDULES = ("ZBVZeroBubble",)  # two stages per rank, rank 0 holding the first and the last


def stages_per_rank(schedule: str) -> int:
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {PIPELINE_SCHEDULES}")
    return 1 if schedule in ("GPipe", "1F1B") else 2


@dataclass(frozen=True)
class ParallelDims:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp_schedule: str = "1F1B"
    pp_microbatches: int = 1  # per micro-batch of train.micro_batch_size sequences

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> ParallelDims:
        """The layout of ``world_size`` processes, dp_shard -1 resolved; one ConfigError listing every
        way it does not fit the processes, the model or the batch. Call it before any process group."""
        parallel = cfg.parallel
        dims = cls(
            parallel.pp, parallel.dp_replicate, _resolve_dp_shard(parallel, world_size), parallel.cp, parallel.tp,
            parallel.pp_schedule, parallel.pp_microbatches or cfg.train.micro_batch_size,
        )  # fmt: skip
        problems = dims._batch_problems(cfg) + dims._tp_problems(cfg) + dims._cp_problems(cfg) + dims._pp_problems(cfg)
        problems += dims._super_patch_problems(cfg)
        if problems:
            raise ConfigError(problems)
        return dims

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

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_DIMS}

    def __str__(self) -> str:
        return " x ".join(f"{name}={size}" for name, size in self.sizes().items() if size > 1) or "1 rank"

    def grad_accum_steps(self, global_batch_size: int, micro_batch_size: int) -> int:
        """Micro-steps per optimizer step on each rank."""
        return global_batch_size // (micro_batch_size * self.dp)

    def build_mesh(self, device_type: str) -> Meshes:
        """The 5-D mesh over the default process group, with the flattened views named above."""
        root = init_device_mesh(device_type, tuple(self.sizes().values()), mesh_dim_names=MESH_DIMS)
        dp = root["dp_replicate", "dp_shard"]._flatten("dp")
        dp_shard_cp = root["dp_shard", "cp"]._flatten("dp_shard_cp")
        if self.dp_replicate == 1:
            fsdp = dp_shard_cp
        elif self.cp == 1:  # a slice of the root reuses its process groups
            fsdp = root["dp_replicate", "dp_shard"]
        else:  # slicing the flattened dp_shard_cp from the root is deprecated (warns on every rank)
            hsdp = root["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
            fsdp = hsdp._unflatten(0, (self.dp_replicate, self.dp_shard * self.cp), ("dp_replicate", "dp_shard_cp"))
        return Meshes(root=root, dp=dp, dp_shard_cp=dp_shard_cp, fsdp=fsdp)

    def _batch_problems(self, cfg: Config) -> list[str]:
        per_step = cfg.train.micro_batch_size * self.dp
        if cfg.train.global_batch_size % per_step == 0:
            return []
        multiple = -(-cfg.train.global_batch_size // per_step) * per_step
        return [
            f"train.global_batch_size: {cfg.train.global_batch_size} is not divisible by "
            f"train.micro_batch_size x data-parallel size = {cfg.train.micro_batch_size} x {self.dp} = "
            f"{per_step}; set train.global_batch_size to a multiple of {per_step} (e.g. {multiple}) "
            "or change train.micro_batch_size"
        ]

    def _tp_problems(self, cfg: Config) -> list[str]:
        if self.tp == 1:
            return []
        if cfg.model.arch != "blt":
            return self._plain_lm_tp_problems(cfg)
        blt, problems = cfg.model.blt, []
        for key in ("global_heads", "global_kv_heads", "local_heads", "local_kv_heads"):
            heads = getattr(blt, key) or getattr(blt, key.replace("kv_", ""))
            if heads % self.tp:
                problems.append(
                    f"parallel.tp: {self.tp} must divide model.blt.{key} ({heads}); "
                    "each tensor-parallel rank holds whole attention heads"
                )
        for key, dim in (("encoder_ffn_dim", blt.local_dim), ("decoder_ffn_dim", blt.local_dim),
                         ("global_ffn_dim", blt.global_dim)):  # fmt: skip
            width = getattr(blt, key) or default_ffn_dim(dim)
            if width % self.tp:
                problems.append(f"parallel.tp: {self.tp} must divide the FFN width model.blt.{key} ({width})")
        return problems

    def _plain_lm_tp_problems(self, cfg: Config) -> list[str]:
        shape, problems = cfg.model.entropy, []
        for key in ("heads", "kv_heads"):
            heads = getattr(shape, key) or shape.heads
            if heads % self.tp:
                problems.append(f"parallel.tp: {self.tp} must divide model.entropy.{key} ({heads}); each "
                                "tensor-parallel rank holds whole attention heads")  # fmt: skip
        width = shape.ffn_dim or default_ffn_dim(shape.dim)
        if width % self.tp:
            problems.append(f"parallel.tp: {self.tp} must divide the FFN width model.entropy.ffn_dim ({width})")
        return problems

    def _super_patch_problems(self, cfg: Config) -> list[str]:
        """Patches of patches run under FSDP and TP; context and pipeline parallelism split the patch
        sequence and the global layers, which the second level does not support."""
        if cfg.model.arch != "blt" or not cfg.model.blt.super_patch.enabled:
            return []
        problems = [
            f"parallel.{name}: model.blt.super_patch with {name} = {size} is not supported (only FSDP and tensor "
            f"parallelism run a two-level BLT); set parallel.{name}: 1 or model.blt.super_patch.enabled: false"
            for name, size in (("cp", self.cp), ("pp", self.pp)) if size > 1
        ]  # fmt: skip
        if self.tp > 1 and (self.tp & (self.tp - 1) or self.tp > SUPER_PATCH_ROW_MULTIPLE):
            problems.append(
                f"parallel.tp: model.blt.super_patch pads super-patches for tensor parallel degrees that are powers "
                f"of two up to {SUPER_PATCH_ROW_MULTIPLE}, got {self.tp}"
            )
        return problems

    def _cp_problems(self, cfg: Config) -> list[str]:
        if self.cp == 1:
            return []
        problems = []
        if cfg.train.seq_len < 2 * self.cp:
            problems.append(
                f"train.seq_len: parallel.cp {self.cp} cuts every sequence into 2 x cp = {2 * self.cp} chunks of at "
                f"least one patch (one byte) each, but train.seq_len is {cfg.train.seq_len}; make train.seq_len >= "
                f"{2 * self.cp} or lower parallel.cp"
            )
        return problems

    def _pp_problems(self, cfg: Config) -> list[str]:
        if self.pp == 1:
            return []
        parallel, problems = cfg.parallel, []
        schedule = parallel.pp_schedule
        num_stages = parallel.pp * stages_per_rank(schedule)
        # BLT's stages split its global layers; a plain LM's (arch entropy, bytelm, tokenlm) all its layers.
        key = "model.blt.global_layers" if cfg.model.arch == "blt" else "model.entropy.layers"
        layers = cfg.model.blt.global_layers if cfg.model.arch == "blt" else cfg.model.entropy.layers
        if num_stages > layers:
            problems.append(
                f"parallel.pp: {parallel.pp} ranks x {stages_per_rank(schedule)} stage(s) per rank ({schedule}) = "
                f"{num_stages} pipeline stages, but {key} is {layers}; every stage needs at least one of these "
                "layers: lower parallel.pp, use a one-stage-per-rank schedule (GPipe, 1F1B) or add layers"
            )
        microbatches = self.pp_microbatches
        if cfg.train.micro_batch_size % microbatches:
            problems.append(
                f"parallel.pp_microbatches: {microbatches} pipeline microbatches must divide train.micro_batch_size "
                f"{cfg.train.micro_batch_size} (every microbatch must have the same shape)"
            )
        if schedule == "1F1B" and microbatches < parallel.pp:
            problems.append(
                f"parallel.pp_microbatches: 1F1B needs at least parallel.pp = {parallel.pp} microbatches, got "
                f"{microbatches}; raise parallel.pp_microbatches (and train.micro_batch_size) or use GPipe"
            )
        if schedule == "Interleaved1F1B" and microbatches % max(1, microbatches // parallel.pp):
            rounds = max(1, microbatches // parallel.pp)
            problems.append(
                f"parallel.pp_microbatches: Interleaved1F1B runs microbatches in rounds of parallel.pp = {parallel.pp}; "
                f"{microbatches} is not a multiple of its {rounds} rounds; use a multiple of {parallel.pp}"
            )
        if schedule in V_SHAPED_SCHEDULES and cfg.train.compile:
            problems.append(f"train.compile: torch's {schedule} schedule does not support torch.compile; set it false")
        return problems


def _resolve_dp_shard(parallel: ParallelConfig, world_size: int) -> int:
    """parallel.dp_shard with -1 resolved; ConfigError when the degrees do not make ``world_size``."""
    others = parallel.pp * parallel.dp_replicate * parallel.cp * parallel.tp
    named = f"pp x dp_replicate x cp x tp = {parallel.pp} x {parallel.dp_replicate} x {parallel.cp} x {parallel.tp}"
    if parallel.dp_shard == -1:
        if world_size % others:
            raise ConfigError([
                f"parallel.dp_shard: -1 takes the rest of the world size, but {world_size} process(es) are not "
                f"divisible by parallel.{named} = {others}; change parallel.* or the number of processes"
            ])  # fmt: skip
        return world_size // others
    if others * parallel.dp_shard != world_size:
        raise ConfigError([
            f"parallel: {named} x dp_shard {parallel.dp_shard} = {others * parallel.dp_shard}, but there are "
            f"{world_size} process(es); make the product equal the number of processes (or set parallel.dp_shard: -1)"
        ])  # fmt: skip
    return parallel.dp_shard


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
