"""Training checkpoints: sharded safetensors, atomic, resumable exactly and under any layout.

``output_dir/checkpoints/step_N/`` holds every rank's shards of the model and AdamW state, written
by torch.distributed.checkpoint (DCP) under layout-free names, and ``metadata.json`` (step, config,
layout, data positions, RNG states, scheduler, shapes, each shard's size and CRC32); ``latest``
names the newest complete one. DCP computes every DTensor shard's offset and plans which pieces a
new layout reads; what it leaves open is ours: the atomic commit (``bltdist.atomic``), integrity,
and the non-tensor state. Async saves run in a thread with a gloo group of their own, so they never
interleave with the training collectives.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from bltdist.atomic import atomic_write, commit
from bltdist.config import CheckpointConfig, config_from_dict
from bltdist.errors import CheckpointSaveFailed, TrainingDiverged, UserError
from bltdist.model_dir import save_weights_dir
from bltdist.parallel.grads import clean_name
from bltdist.training.entropy_training import ENTROPY_MODEL_DIR, write_entropy_model

FORMAT = "bltdist-checkpoint"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
LATEST_FILE = "latest"
SHARD_SUFFIX = ".safetensors"
STEP_DIR = re.compile(r"step_(\d+)")
CHECKSUM_CHUNK = 16 << 20
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# One process saves and loads with no_dist=True, exactly that intent; torch still warns at each call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def resolve_resume(cfg: CheckpointConfig, output_dir: str | Path) -> tuple[Path | None, str | None]:
    """The checkpoint to resume (None for a fresh start) and, when it is not what ``latest`` names,
    a line that says why. ``auto`` follows ``latest`` in output_dir; when ``latest`` is missing or
    names no complete checkpoint, the newest complete one is taken; with none it starts fresh."""
    root = checkpoints_dir(output_dir)
    if cfg.resume is None:
        found = complete_checkpoints(root)
        if found:
            raise UserError(
                f"output_dir {output_dir} already holds checkpoints ({', '.join(p.name for p in found)}): a new run "
                "there would delete them and add to its metrics.jsonl; resume with --checkpoint.resume auto, or "
                "give another output_dir"
            )
        return None, None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if not (path / METADATA_FILE).is_file():
            raise UserError(
                f"checkpoint.resume: {path} is not a bltdist checkpoint (no {METADATA_FILE}); give a "
                f"directory such as {root / 'step_1000'} or 'auto'"
            )
        return path, None
    latest, found = root / LATEST_FILE, complete_checkpoints(root)
    named = latest.read_text(encoding="utf-8", errors="replace").strip() if latest.is_file() else None
    if named is not None and ("/" in named or "\\" in named or named.startswith(".")):
        raise UserError(
            f"{latest} names {named!r}, outside this run's checkpoints; it must name a step_N directory beside "
            f"it: fix or delete the file (then the newest complete checkpoint is resumed)"
        )
    if named is not None and root / named in found:
        return root / named, None
    if not found:
        if named is not None:
            raise UserError(f"{latest} names {named!r}, but {root} holds no complete checkpoint; delete {latest} to start afresh")
        return None, None
    why = "is missing" if named is None else f"names {named!r}, which is not a complete checkpoint"
    return found[-1], f"{latest} {why}: resuming from the newest complete checkpoint, {found[-1].name}"


def read_metadata(path: Path) -> dict:
    metadata_file = path / METADATA_FILE
    try:
        metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{metadata_file}: cannot be read ({error}); resume from another checkpoint") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise UserError(f"{metadata_file}: not a {FORMAT} metadata file; resume from a bltdist checkpoint")
    if metadata.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{metadata_file}: format version {metadata.get('version')}, this bltdist reads {FORMAT_VERSION}"
        )
    return metadata


def check_resumable(cfg: CheckpointConfig, output_dir: str | Path, run_config: dict, model: nn.Module) -> None:
    """Before any process starts training or writes a file: the checkpoint to resume is complete
    and holds a model of ``model``'s shapes (a model on the meta device is enough), and the run's
    ``run_config`` (a config dict) keeps the batch, sequence length and seed the data position needs."""
    path, _ = resolve_resume(cfg, output_dir)
    if path is None:
        return
    metadata = read_metadata(path)
    _check_shard_files(path, metadata)
    saved_train, train = metadata["config"]["train"], run_config["train"]
    changed = [f"train.{key} {saved_train[key]} -> {train[key]}" for key in ("global_batch_size", "seq_len", "seed")
               if saved_train[key] != train[key]]  # fmt: skip
    if changed:
        raise UserError(
            f"{path}: cannot resume with {', '.join(changed)}: the data position and order depend on them; "
            "resume with the checkpoint's values, or start a new output_dir (with checkpoint.init_from for its weights)"
        )
    _check_entropy_model_training(path, metadata["config"], run_config)
    saved = metadata["tensors"]["model"]
    problems = [f"missing tensor {name}" for name in model.state_dict() if name not in saved]
    problems += [
        f"tensor {name}: shape {tuple(saved[name]['shape'])} in the checkpoint, {tuple(tensor.shape)} in the model"
        for name, tensor in model.state_dict().items()
        if name in saved and tuple(saved[name]["shape"]) != tuple(tensor.shape)
    ]
    problems += [f"unexpected tensor {name}" for name in saved if name not in model.state_dict()]
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:20])
        raise UserError(
            f"{path / METADATA_FILE}: the checkpoint holds a different model than configured:\n{listed}\n"
            "resume with the model.* settings of that checkpoint (its config is in the metadata) "
            "or start a new output_dir"
        )


def _check_entropy_model_training(path: Path, saved_config: dict, run_config: dict) -> None:
    """A switch of patching.entropy_model_training is refused either way. joint -> frozen would patch
    with patching.entropy_model, not the entropy model the checkpoint trained; frozen -> joint has no
    entropy optimizer or schedule to resume, and a fresh one mid-run makes a run that no uninterrupted
    run reproduces. Both are a new run started from the checkpoint's consolidated model."""
    saved = saved_config.get("patching", {}).get("entropy_model_training", "frozen")
    wanted = run_config["patching"]["entropy_model_training"]
    if saved == wanted:
        return
    if saved == "joint":
        why = ("its entropy model trained alongside the BLT, and frozen patching would use patching.entropy_model "
               "instead; to freeze the trained one, `python -m bltdist.convert consolidate` the checkpoint and start "
               "a new output_dir with checkpoint.init_from set to the consolidated directory and "
               "patching.entropy_model to its entropy_model subdirectory")  # fmt: skip
    else:
        why = ("it holds no entropy model optimizer or schedule to resume; to train the entropy model from here, "
               "`python -m bltdist.convert consolidate` the checkpoint and start a new output_dir with "
               "checkpoint.init_from set to the consolidated directory and patching.entropy_model_training: joint")  # fmt: skip
    raise UserError(f"{path}: cannot resume with patching.entropy_model_training {saved} -> {wanted}: {why}; "
                    f"or resume with patching.entropy_model_training: {saved}")  # fmt: skip


def _check_shard_files(path: Path, metadata: dict) -> None:
    listed = {shard["file"] for shard in metadata["shards"]}
    stray = sorted(p.name for p in path.glob(f"*{SHARD_SUFFIX}") if p.name not in listed)
    if stray:
        raise UserError(
            f"{path} holds {', '.join(stray)}, which its {METADATA_FILE} does not list (a stray copy would be read as "
            "part of the checkpoint); move it out of the checkpoint directory"
        )
    for shard in metadata["shards"]:
        file = path / shard["file"]
        if not file.is_file():
            raise UserError(f"{file}: missing shard of checkpoint {path}; restore the file or resume from another checkpoint")
        if file.stat().st_size != shard["bytes"]:
            raise UserError(
                f"{file}: {file.stat().st_size} bytes, {shard['bytes']} when saved (truncated or damaged); "
                "restore the file or resume from another checkpoint"
            )


def _crc32(file: Path) -> str:
    crc = 0
    with open(file, "rb") as handle:
        while chunk := handle.read(CHECKSUM_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _share(items: list, rank: int, world_size: int) -> list:
    """This rank's share of a list every rank sees in the same order: the work is split evenly."""
    return items[rank::world_size]


def verify_checksums(path: Path, metadata: dict, group: dist.ProcessGroup | None = None) -> None:
    """Every shard's size and CRC32 against the metadata, each rank reading its share of the files;
    every rank raises the same UserError naming the damaged files."""
    _check_shard_files(path, metadata)
    rank, world_size = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    problems = [
        f"{path / shard['file']}: checksum {actual}, {shard['crc32']} when saved"
        for shard in _share(metadata["shards"], rank, world_size)
        if (actual := _crc32(path / shard["file"])) != shard["crc32"]
    ]
    if group is not None:
        gathered: list[list[str]] = [[] for _ in range(world_size)]
        dist.all_gather_object(gathered, problems, group=group)
        problems = [problem for rank_problems in gathered for problem in rank_problems]
    if problems:
        raise UserError(
            f"checkpoint {path} is damaged:\n" + "\n".join(f"  - {p}" for p in problems)
            + "\nrestore the files or resume from another checkpoint with --checkpoint.resume PATH"
        )


def _tensor_state(model_parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """Model and optimizer tensors by layout-free names. The optimizer is keyed through the model
    parts because one optimizer spans every part a rank holds (DCP's optimizer helpers want one
    module per optimizer)."""
    model_state: dict[str, Any] = {}
    names: dict[nn.Parameter, str] = {}
    for part in model_parts:
        model_state.update(get_model_state_dict(part))
        names.update({param: clean_name(name) for name, param in part.named_parameters()})
    optimizer_state = {
        names[param]: optimizer.state[param]
        for group in optimizer.param_groups
        for param in group["params"]
        if optimizer.state[param]
    }
    return {"model": model_state, "optimizer": optimizer_state}


def _materialise_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's lazily built state so that a checkpoint can be loaded into it in place: one
    step with zero gradients at learning rate 0 leaves every parameter bit for bit unchanged."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    if all(optimizer.state[param] for param in params):
        return
    learning_rates = [group["lr"] for group in optimizer.param_groups]
    for param in params:
        param.grad = torch.zeros_like(param)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, learning_rates):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _shapes(state: dict[str, dict]) -> dict[str, dict]:
    return {
        section: {
            name: {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
            for name, tensor in _flatten(tensors)
        }
        for section, tensors in state.items()
    }


def _root_cause(error: BaseException) -> str:
    failures = getattr(error, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if failures:
        first = next(iter(failures.values()))
        error = getattr(first, "exc", first)
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _first_nonfinite_weight(model_state: dict) -> str | None:
    for name, tensor in model_state.items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name
    return None


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    items = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        items += _flatten(value, f"{name}.") if isinstance(value, dict) else [(name, value)]
    return items


def _copy_to_cpu(tree: Any) -> Any:
    """A snapshot of the state that training can keep changing: DTensors keep their layout."""
    if isinstance(tree, dict):
        return {key: _copy_to_cpu(value) for key, value in tree.items()}
    if isinstance(tree, DTensor):
        local = tree.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(local, tree.device_mesh, tree.placements, run_check=False,
                                  shape=tree.shape, stride=tree.stride())  # fmt: skip
    return tree.detach().to("cpu", copy=True)


def _rng_state(device: torch.device) -> dict[str, str]:
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return {name: base64.b64encode(state.numpy().tobytes()).decode("ascii") for name, state in states.items()}


def _set_rng_state(saved: dict[str, str], device: torch.device) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(saved["torch"]))
    if device.type == "cuda" and "cuda" in saved:
        torch.cuda.set_rng_state(decode(saved["cuda"]), device)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories with their metadata written, oldest step first."""
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := STEP_DIR.fullmatch(p.name))]
    return [path for _, path in sorted(found) if (path / METADATA_FILE).is_file()]


class Checkpointer:
    """Saves the training state every ``checkpoint.interval`` steps, at the end and on SIGTERM or
    SIGUSR1, and resumes from ``checkpoint.resume``.

    Built before anything is written to output_dir: it checks the checkpoint to resume (its
    checksums, split over the ranks) so that a damaged one stops the run with nothing changed.
    Collective: every rank builds one.
    """

    def __init__(self, cfg: CheckpointConfig, output_dir: str | Path, run_config: dict, final_step: int,
                 layout: dict[str, int], dp_rank: int, device: torch.device):  # fmt: skip
        self.cfg, self.run_config, self.final_step = cfg, run_config, final_step
        self.layout = layout
        self.dp_rank = dp_rank
        self.device = device
        self.root = checkpoints_dir(output_dir)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        # DCP's planning collectives run in the async writer's thread: a group of their own keeps
        # them from interleaving with the training collectives (gloo, so CPU buffers work).
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.executor = ThreadPoolExecutor(max_workers=1) if cfg.async_save else None
        self.pending: Future | None = None
        self.preempted = False
        if self.rank == 0 and self.root.is_dir():
            # Left by a save that was interrupted; never read, and in the way of the next save.
            for leftover in self.root.glob(".step_*"):
                shutil.rmtree(leftover)
        self.resume_from, self.resume_note = resolve_resume(cfg, output_dir)
        if self.resume_from is not None:
            self.resume_metadata = read_metadata(self.resume_from)
            verify_checksums(self.resume_from, self.resume_metadata, self.group)
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._on_preemption_signal)
        self.state: tuple | None = None
        self.entropy_training = None

    def _on_preemption_signal(self, signum, frame) -> None:
        self.preempted = True

    def restore(self, model_parts: list[nn.Module], optimizer, scheduler, loader, entropy_training=None) -> int:
        """Hands over the training state the checkpointer saves from now on, loads the checkpoint
        to resume into it (if any) and returns the number of steps already done. ``entropy_training``
        (``bltdist.training.entropy_training``): the threshold in use and a jointly trained entropy model."""
        self.state = (model_parts, optimizer, scheduler, loader)
        self.entropy_training = entropy_training
        if self.resume_from is None:
            return 0
        metadata = self.resume_metadata
        _materialise_optimizer_state(optimizer)
        tensors = _tensor_state(model_parts, optimizer)
        if entropy_training is not None:
            if entropy_training.optimizer is not None:
                _materialise_optimizer_state(entropy_training.optimizer)
            tensors.update(entropy_training.checkpoint_tensors())
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(self.resume_from)),
                 process_group=self.group, no_dist=self.group is None)  # fmt: skip
        for part in model_parts:
            names = set(get_model_state_dict(part))
            set_model_state_dict(part, {name: t for name, t in tensors["model"].items() if name in names})
        for group, lr in zip(optimizer.param_groups, metadata["optimizer"]["lr"]):
            group["lr"] = lr
        scheduler.load_state_dict(metadata["scheduler"])
        consumed = {state["global_sequences_consumed"] for state in metadata["data_loader"].values()}
        if len(consumed) != 1:
            raise UserError(f"{self.resume_from / METADATA_FILE}: data-parallel ranks disagree on the data position")
        loader.load_state_dict(next(iter(metadata["data_loader"].values())))
        if entropy_training is not None and "patching" in metadata:
            entropy_training.restore(tensors, metadata["patching"])
        rng_states = metadata["rng"]
        _set_rng_state(rng_states[self.rank % len(rng_states)], self.device)
        return metadata["step"]

    def after_step(self, step: int) -> bool:
        """Saves when due; True when a preemption signal arrived: the state is saved, stop now."""
        if self.pending is not None and self.pending.done():
            self.wait()  # an async save that failed stops the run now, not at the next save
        preempted = self._agree(self.preempted)
        if preempted or (step == self.final_step and self.cfg.final) or (self.cfg.interval and step % self.cfg.interval == 0):
            self.save(step)
        if preempted:
            self.wait()
        return preempted

    def _agree(self, flag: bool) -> bool:
        """Ranks may receive a signal at different steps; all stop at the first step any saw it."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def save(self, step: int) -> None:
        model_parts, optimizer, scheduler, loader = self.state
        self.wait()
        tensors = _tensor_state(model_parts, optimizer)
        if self.entropy_training is not None:
            tensors.update(self.entropy_training.checkpoint_tensors())
        per_rank = {"rank": self.rank, "dp_rank": self.dp_rank, "loader": loader.state_dict(),
                    "rng": _rng_state(self.device), "shapes": _shapes(tensors),
                    "nonfinite": _first_nonfinite_weight(tensors["model"])}  # fmt: skip
        gathered = [per_rank]
        if dist.is_initialized():
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, per_rank)
        bad = [f"{entry['nonfinite']} on rank {entry['rank']}" for entry in gathered if entry["nonfinite"]]
        if bad:
            raise TrainingDiverged(
                f"step {step}: not saved, the weights hold NaN or infinite values (first: {bad[0]}); the last "
                "checkpoint stays the newest: resume from it with a lower optim.lr"
            )
        metadata = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            "torch": torch.__version__,
            "layout": self.layout,
            "consumed": {
                "sequences": loader.global_sequences_consumed,
                "bytes": loader.global_tokens_consumed,
            },
            "data_loader": {str(entry["dp_rank"]): entry["loader"] for entry in gathered},
            "rng": [entry["rng"] for entry in gathered],
            "scheduler": scheduler.state_dict(),
            "optimizer": {
                "lr": [group["lr"] for group in optimizer.param_groups],
                "steps": max((int(s["step"]) for s in optimizer.state.values() if "step" in s), default=0),
            },
            "tensors": {
                section: {name: spec for entry in gathered for name, spec in entry["shapes"][section].items()}
                for section in tensors
            },
            "config": self.run_config,
        }
        if self.entropy_training is not None:
            metadata["patching"] = self.entropy_training.checkpoint_metadata()
        if self.executor is None:
            self._write(tensors, metadata)
        else:
            self.pending = self.executor.submit(self._write, _copy_to_cpu(tensors), metadata)

    def _write(self, tensors: dict, metadata: dict) -> None:
        name = f"step_{metadata['step']}"
        staging = self.root / f".{name}.tmp"
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self._barrier()
        try:
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(staging), save_distributed=True),
                     process_group=self.group, no_dist=self.group is None)  # fmt: skip
        except (Exception, CheckpointException) as error:  # a BaseException: DCP gathers every rank's failure
            raise CheckpointSaveFailed(
                f"checkpoint of step {metadata['step']} could not be written to {staging}: {_root_cause(error)}; "
                f"{self._newest_note()} free space or fix the storage, then resume with --checkpoint.resume auto"
            ) from None
        # dcp.save returns on every rank only after the coordinator has every rank's write results.
        files = sorted(p.name for p in staging.iterdir() if p.name.endswith(SHARD_SUFFIX))
        sums = {file: (_crc32(staging / file), (staging / file).stat().st_size)
                for file in _share(files, self.rank, self.world_size)}  # fmt: skip
        if self.group is not None:
            gathered: list[dict] = [{} for _ in range(self.world_size)]
            dist.all_gather_object(gathered, sums, group=self.group)
            sums = {file: value for rank_sums in gathered for file, value in rank_sums.items()}
        if self.rank == 0:
            metadata["shards"] = [{"file": file, "bytes": sums[file][1], "crc32": sums[file][0]} for file in files]
            self._commit(staging, self.root / name, metadata)
        self._barrier()

    def _newest_note(self) -> str:
        found = complete_checkpoints(self.root)
        return f"the newest complete checkpoint is still {found[-1]};" if found else "no checkpoint is complete yet;"

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def _commit(self, staging: Path, final: Path, metadata: dict) -> None:
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=1), encoding="utf-8")
        commit(staging, final)  # the same step may exist already, after resuming from an earlier one
        atomic_write(self.root / LATEST_FILE, final.name)
        keep = self.cfg.keep_last
        if keep:
            older = [p for p in complete_checkpoints(self.root) if p != final]
            for old in older[: max(0, len(older) - (keep - 1))]:
                shutil.rmtree(old)

    def latest(self) -> Path:
        """The newest complete checkpoint (``latest`` may be missing after a resume that saved nothing)."""
        return complete_checkpoints(self.root)[-1]

    def wait(self) -> None:
        """Blocks until the async save in flight (if any) is complete; re-raises its error."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        self.wait()
        if self.executor is not None:
            self.executor.shutdown()
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


def consolidate(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """One process: the model weights of a sharded checkpoint as one bltdist model directory
    (config.yaml + model.safetensors), as ``checkpoint.init_from`` and the converters read it."""
    path = Path(checkpoint)
    if not (path / METADATA_FILE).is_file():
        raise UserError(f"{path}: not a bltdist checkpoint (no {METADATA_FILE}); give a directory like runs/x/checkpoints/step_N")
    metadata = read_metadata(path)
    verify_checksums(path, metadata)
    sections = {section: {name: torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]))
                          for name, spec in metadata["tensors"][section].items()}
                for section in ("model", "entropy_model") if section in metadata["tensors"]}  # fmt: skip
    dcp.load(sections, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
    cfg = config_from_dict(metadata["config"], str(path / METADATA_FILE))
    if "patching" in metadata:  # the threshold in use, which patching.target_patch_size may have moved
        cfg.patching.threshold = metadata["patching"]["threshold"]
    loaded_entropy_model = cfg.patching.entropy_model
    if "entropy_model" in sections:  # jointly trained: the model directory holds its entropy model
        cfg.patching.entropy_model = ENTROPY_MODEL_DIR
    model_dir = save_weights_dir(sections["model"], cfg, out_dir)
    if "entropy_model" in sections:
        write_entropy_model(sections["entropy_model"], loaded_entropy_model, model_dir / ENTROPY_MODEL_DIR)
    return model_dir
