"""The entropy model: a trained model directory, and its entropies computed online per document chunk.

How entropies are defined (the one rule that online and precomputed patching share): the entropy
of a token is a function of its document alone. A document is tokenised as the loader does it,
[BOS] + bytes + [EOS], and cut into consecutive chunks of ``context`` tokens, ``context`` being the
sequence length the entropy model was trained with (its run's ``train.seq_len``). Each chunk is
run through the entropy model on its own, as one row of exactly its own length, so the numbers
for a chunk are bit-for-bit the same whoever computes them (the precompute tool, a data loader
worker, or the trainer) on the same kind of device. The packed sequences of training then take
the entropies of whatever document spans they cover, and patches are cut per packed sequence by
``bltdist.patching.patch_starts``. This is also how the BLT reference precomputes entropies
(per document, in chunks of the entropy model's maximum length).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from bltdist.config import load_config
from bltdist.errors import ConfigError, UserError
from bltdist.model import ByteLM
from bltdist.model_dir import CONFIG_FILE, WEIGHTS_FILE, load_model_weights
from bltdist.patching.tokens import document_tokens

# Chunks kept by an online source: consecutive sequences share the chunk at their boundary.
ONLINE_CACHE_CHUNKS = 256


class EntropyModelError(UserError):
    """A path given as an entropy model that is not a trained entropy model directory."""


class EntropyModel:
    """A trained entropy model directory (``config.yaml`` + ``model.safetensors`` of a run with
    ``model.arch: entropy``). The network itself is built only when entropies are computed."""

    def __init__(self, directory: str | Path, device: torch.device | str = "cpu", key: str = "--entropy-model"):
        self.directory = Path(directory)
        self.device = torch.device(device)
        _check_entropy_model_dir(self.directory, key)
        try:
            run_config = load_config(str(self.directory / CONFIG_FILE), [])
        except ConfigError as error:
            raise EntropyModelError(f"{key}: {self.directory / CONFIG_FILE} is not a valid run config: {error}") from error
        if run_config.model.arch != "entropy":
            raise EntropyModelError(
                f"{key}: {self.directory} holds a {run_config.model.arch} model, not an entropy model "
                "(its config.yaml has model.arch: " + run_config.model.arch + "); give a checkpoint of a run "
                "trained with model.arch: entropy, e.g. runs/entropy_tiny/model"
            )
        self.config = run_config.model.entropy
        self.context = run_config.train.seq_len
        self._network: ByteLM | None = None
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights, the shape and the context: precomputed entropies are only valid for it."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            with open(self.directory / WEIGHTS_FILE, "rb") as weights:
                for block in iter(lambda: weights.read(1 << 20), b""):
                    digest.update(block)
            shape = json.dumps({"model": vars(self.config), "context": self.context}, sort_keys=True)
            digest.update(shape.encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @property
    def network(self) -> ByteLM:
        if self._network is None:
            with torch.device("meta"):
                network = ByteLM(self.config)
            network.to_empty(device=self.device)
            load_model_weights(network, self.directory)
            self._network = network.eval()
        return self._network

    def num_chunks(self, document: bytes) -> int:
        return -(-(len(document) + 2) // self.context)

    def chunk_entropies(self, document: bytes, chunk: int) -> np.ndarray:
        """float32 entropies of tokens [chunk * context, (chunk + 1) * context) of ``document``."""
        tokens = document_tokens(document, chunk * self.context, (chunk + 1) * self.context)
        row = torch.from_numpy(tokens).long().to(self.device).unsqueeze(0)
        return self.network.entropies(row)[0].float().cpu().numpy()

    def document_entropies(self, document: bytes) -> np.ndarray:
        """float32 entropies of all len(document) + 2 tokens of ``document``."""
        return np.concatenate([self.chunk_entropies(document, chunk) for chunk in range(self.num_chunks(document))])


class OnlineEntropies:
    """EntropySource that runs the entropy model on the chunks a batch needs, keeping recent chunks."""

    def __init__(self, model: EntropyModel, documents: list[bytes]):
        self.model = model
        self.documents = documents
        self._chunks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def span(self, document_index: int, start: int, stop: int) -> np.ndarray:
        context = self.model.context
        pieces = [
            self._chunk(document_index, chunk)[max(start - chunk * context, 0) : stop - chunk * context]
            for chunk in range(start // context, -(-stop // context))
        ]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _chunk(self, document_index: int, chunk: int) -> np.ndarray:
        key = (document_index, chunk)
        if key in self._chunks:
            self._chunks.move_to_end(key)
        else:
            self._chunks[key] = self.model.chunk_entropies(self.documents[document_index], chunk)
            if len(self._chunks) > ONLINE_CACHE_CHUNKS:
                self._chunks.popitem(last=False)
        return self._chunks[key]


def _check_entropy_model_dir(directory: Path, key: str) -> None:
    if not directory.exists():
        raise EntropyModelError(
            f"{key}: {directory} does not exist; train an entropy model first "
            "(python -m bltdist.train configs/entropy_tiny.yaml) and give its checkpoint directory"
        )
    if not directory.is_dir():
        raise EntropyModelError(f"{key}: {directory} is a file; give a model directory (config.yaml + {WEIGHTS_FILE})")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / name).is_file()]
    if not missing:
        return
    checkpoints = sorted((directory / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[-1]))
    if (directory / "model" / CONFIG_FILE).is_file():
        hint = f"; {directory} looks like a run directory: give its final model, {directory / 'model'}"
    elif checkpoints:
        hint = (
            f"; {directory} looks like an unfinished run: turn its latest checkpoint into a model directory with "
            f"`python -m bltdist.convert consolidate {checkpoints[-1]} OUT_DIR`"
        )
    else:
        hint = "; give the model directory (output_dir/model) of a run trained with model.arch: entropy"
    raise EntropyModelError(
        f"{key}: {directory} is not an entropy model directory (missing {', '.join(missing)}){hint}"
    )
