"""What training does about entropy patching beyond the patcher: the threshold held at its target
(``patching.target_patch_size``) and the entropy model trained alongside the BLT
(``patching.entropy_model_training: joint``).

Joint training: every rank holds the whole entropy model (it is small next to the BLT) and runs it
on the micro-batches it trains the BLT on. Its forward with gradients comes first; the entropies of
that forward (its weights change only at the optimizer step, so they equal a no-grad forward)
place the BLT's patch boundaries; its loss is the next-byte loss of the same bytes. Its gradients
are summed over the data-parallel ranks (ranks of one data-parallel position hold the same
micro-batches and so the same gradients), each rank's loss scaled by the bytes of the global
batch: the gradient of the global mean loss, as in one process. Its own AdamW takes the optim.*
settings with ``patching.entropy_lr`` as the peak learning rate, on the BLT's schedule.

Entropies of joint training are those of each packed row (the entropy model's attention stays
inside documents), not of the per-document chunks a frozen model's precomputed entropies use.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.distributed as dist

from bltdist.config import Config, load_config
from bltdist.model import ByteLM
from bltdist.model.loss import byte_loss_sum
from bltdist.model_dir import CONFIG_FILE, load_model_weights, save_weights_dir
from bltdist.parallel import Meshes
from bltdist.patching.patcher import Patcher
from bltdist.training.optim import build_optimizer, build_scheduler

ENTROPY_MODEL_DIR = "entropy_model"  # beside a consolidated BLT's weights, in its model directory


class EntropyTraining:
    """The threshold in use and, in joint mode, the entropy model with its optimizer and schedule."""

    def __init__(self, cfg: Config, patcher: Patcher, mesh: Meshes | None, device: torch.device):
        self.patcher, self.cfg = patcher, cfg
        self.dp_group = mesh.dp.get_group() if mesh is not None and mesh.dp.size() > 1 else None
        self.loss_divisor = cfg.train.global_batch_size * cfg.train.seq_len
        self.loss_sum, self.loss_steps = 0.0, 0
        self.net = self.optimizer = self.scheduler = None
        if patcher.joint:
            source = patcher.entropy_model
            with torch.device("meta"):
                self.net = ByteLM(source.config, cfg.model.attention_backend)
            self.net.to_empty(device=device)
            load_model_weights(self.net, source.directory)
            optim = dataclasses.replace(cfg.optim, lr=cfg.patching.entropy_lr or cfg.optim.lr)
            self.optimizer = build_optimizer([self.net], optim, device)
            self.scheduler = build_scheduler(self.optimizer, optim, cfg.train.steps)

    @property
    def joint(self) -> bool:
        return self.net is not None

    def entropies(self, tokens: torch.Tensor, targets: torch.Tensor, backward: bool) -> torch.Tensor:
        """Next-byte entropies (B, T) of the current entropy model; in training (``backward``) its
        loss on the same bytes is back-propagated too, from the same forward."""
        if not backward:
            return self.net.entropies(tokens)
        logits = self.net(tokens)
        loss_sum = byte_loss_sum(logits, targets)
        (loss_sum / self.loss_divisor).backward()
        self.loss_sum += float(loss_sum.detach())
        log_probs = torch.log_softmax(logits.detach(), dim=-1)
        return -(log_probs.exp() * log_probs).sum(dim=-1)

    def step(self, grad_clip: float) -> None:
        """The entropy model's optimizer step, after the micro-batches of one BLT step."""
        grads = [p.grad for p in self.net.parameters()]
        if self.dp_group is not None:
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, group=self.dp_group)
            for grad, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(summed)
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), grad_clip if grad_clip > 0 else math.inf)
        if math.isfinite(float(norm)):  # the same on every rank: the gradients are
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_steps += 1

    def after_step(self, step: int) -> None:
        """Recalibrates the threshold when due: after step 1 (a configured threshold that misses the
        target is used once) and every ``patching.recalibrate_interval`` steps. Collective."""
        interval = self.cfg.patching.recalibrate_interval
        if self.patcher.holds_target and (step == 1 or step % interval == 0):
            self.patcher.recalibrate()

    def record(self) -> dict:
        """Metric-line figures: the threshold in use and, in joint mode, the entropy model's mean loss
        since the last line (over the global batch). Collective in joint mode."""
        if self.patcher.entropy_model is None:
            return {}
        record = {"patch_threshold": self.patcher.threshold}
        if self.net is not None:
            total = torch.tensor([self.loss_sum], dtype=torch.float64)
            if self.dp_group is not None:
                dist.all_reduce(total, group=self.dp_group)
            steps = max(self.loss_steps, 1)
            record["entropy_loss"] = float(total) / (self.loss_divisor * steps)
            self.loss_sum, self.loss_steps = 0.0, 0
        return record

    # Checkpoints: the entropy model and its AdamW state as tensor sections of their own, the
    # threshold and the schedule in the metadata.

    def checkpoint_tensors(self) -> dict[str, dict]:
        if self.net is None:
            return {}
        names = {param: name for name, param in self.net.named_parameters()}
        state = {names[p]: self.optimizer.state[p] for p in self.net.parameters() if self.optimizer.state[p]}
        return {"entropy_model": self.net.state_dict(), "entropy_optimizer": state}

    def checkpoint_metadata(self) -> dict:
        metadata = {"threshold": self.patcher.threshold}
        if self.scheduler is not None:
            metadata["entropy_scheduler"] = self.scheduler.state_dict()
        return metadata

    def restore(self, tensors: dict[str, dict], metadata: dict) -> None:
        """After the checkpoint's tensors were loaded in place into ``checkpoint_tensors()``."""
        self.patcher.threshold = metadata["threshold"]
        if self.net is not None:
            self.net.load_state_dict(tensors["entropy_model"])
            self.scheduler.load_state_dict(metadata["entropy_scheduler"])
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr


def write_entropy_model(tensors: dict[str, torch.Tensor], loaded_from: str, out_dir: Path) -> Path:
    """The jointly trained entropy model of a checkpoint as a model directory, with the config of the
    entropy model it started from (``loaded_from``): its shape and context (the chunk length of
    frozen use), so that the directory serves as patching.entropy_model."""
    return save_weights_dir(tensors, load_config(str(Path(loaded_from) / CONFIG_FILE), []), out_dir)
