"""The BPE baseline's tokenizer (``model.arch: tokenlm``): byte-level BPE from Hugging Face ``tokenizers``,
and how a packed byte row becomes a row of BPE tokens that covers exactly the same bytes.

Training: on the run's training split only, documents in their stored order, each source giving its
weight's share of ``model.tokenlm.sample_bytes`` (whole documents), so the same data and config give
a byte-identical ``tokenizer.json``. The run keeps it as ``output_dir/tokenizer.json`` (written once,
read again on resume, never retrained; ``tokenizer_origin.json`` beside it records the sample's digest,
so a resume whose training split or settings changed stops before the start) and the model directory
carries a copy.

Bytes: every byte is first mapped to a printable character (GPT-2's table), so any byte string,
valid UTF-8 or not, is text to the tokenizer, and the 256 single bytes are all in the vocabulary.
Ids: the byte path's specials keep their ids (0 = padding, 1 = BOS, 2 = EOS, 3 reserved); BPE
token i is id i + 4.

Rows: the loader serves inputs and targets, a window of L + 1 ids of the packed stream; the byte
models predict its last L. The token row is the window's first id as its own token, then each
document segment of the rest (BOS and EOS are tokens of their own) BPE-encoded on its own; the
token model predicts every token after the first. Those targets hold exactly the window's last L
ids, and consecutive rows overlap by one id: every byte of the stream is predicted exactly once,
and bits per byte divide the summed token loss by the same byte count as for the byte models.
A segment cut by a row edge is encoded from the edge, as a BPE model reads a chunk of a document.
Rows are right-padded to the batch's longest, rounded up to ``TOKEN_BUCKET``; padding carries no loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from bltdist.atomic import atomic_file, atomic_write
from bltdist.config import Config
from bltdist.errors import UserError
from bltdist.model.loss import IGNORE_INDEX
from bltdist.patching.tokens import BOE_ID, BYTE_OFFSET

TOKENIZER_FILE = "tokenizer.json"
ORIGIN_FILE = "tokenizer_origin.json"  # what the run's tokenizer was made from, checked on resume
SPECIAL_IDS = BYTE_OFFSET  # ids below this are BOE/padding, BOS, EOS and one reserved id
TOKEN_BUCKET = 16


def _byte_characters() -> list[str]:
    """GPT-2's printable character for each byte value: printable Latin-1 as itself, the rest from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for value in range(256):
        if value in printable:
            characters[value] = chr(value)
        else:
            characters[value] = chr(256 + extra)
            extra += 1
    return [characters[value] for value in range(256)]


BYTE_CHARACTERS = _byte_characters()
_TRANSLATION = str.maketrans({chr(value): character for value, character in enumerate(BYTE_CHARACTERS)})
_SPACE, _NEWLINE = BYTE_CHARACTERS[ord(" ")], BYTE_CHARACTERS[ord("\n")]
# Pre-tokens (BPE never merges across them): a word with its leading space, runs of spaces that
# precede no word, runs of newlines.
WORD_PATTERN = f"{_SPACE}?[^{_SPACE}{_NEWLINE}]+|{_SPACE}+(?![^{_SPACE}{_NEWLINE}])|{_SPACE}|{_NEWLINE}+"


def byte_text(data: bytes) -> str:
    return data.decode("latin-1").translate(_TRANSLATION)


def train_bpe(documents: Iterable[bytes], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (fewer when the text has fewer merges) trained on ``documents``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=BYTE_CHARACTERS, show_progress=False)
    tokenizer.train_from_iterator((byte_text(document) for document in documents), trainer)
    return tokenizer


def training_sample(sources, sample_bytes: int) -> list[bytes]:
    """Whole documents of each training source in stored order, up to its weight's share of ``sample_bytes``
    (at least one document per source)."""
    total_weight = sum(source.weight for source in sources)
    sample = []
    for source in sources:
        budget, taken = sample_bytes * source.weight / total_weight, 0
        for index in range(len(source.documents)):
            document = source.documents[index]
            sample.append(document)
            taken += len(document)
            if taken >= budget:
                break
    return sample


class BPETokenizer:
    """Turns packed byte rows into token rows; see the module docstring."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        byte_ids = [tokenizer.token_to_id(character) for character in BYTE_CHARACTERS]
        if None in byte_ids:
            raise UserError("tokenizer: a single byte is missing from the vocabulary; it was not trained by bltdist")
        self.byte_token_ids = np.array(byte_ids, dtype=np.int64) + SPECIAL_IDS

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception for unreadable files
            raise UserError(f"{path}: not a readable tokenizer file ({error}); delete it to train a new one") from None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def to_ids(self, data: bytes) -> list[int]:
        """Model ids of a byte string encoded on its own."""
        return [token + SPECIAL_IDS for token in self.tokenizer.encode(byte_text(data)).ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a model id stands for (empty for the specials)."""
        if token_id < SPECIAL_IDS:
            return b""
        text = self.tokenizer.id_to_token(token_id - SPECIAL_IDS)
        return bytes(BYTE_CHARACTERS.index(character) for character in text)

    def encode_rows(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(token inputs, token targets, count of target tokens) for byte rows (B, L); token rows are
        (B, T) on the rows' device, targets of padding IGNORE_INDEX."""
        windows = torch.cat([inputs[:, :1], targets], dim=1).cpu().numpy()
        rows = [self._row_pieces(window) for window in windows]
        texts = [piece for pieces in rows for piece in pieces if isinstance(piece, bytes)]
        encoded = iter(self.tokenizer.encode_batch([byte_text(text) for text in texts]))
        token_rows = []
        for window, pieces in zip(windows, rows):
            first = int(window[0]) if window[0] < SPECIAL_IDS else int(self.byte_token_ids[window[0] - BYTE_OFFSET])
            row = [first]
            for piece in pieces:
                row.extend([piece] if isinstance(piece, int) else (t + SPECIAL_IDS for t in next(encoded).ids))
            token_rows.append(row)
        width = -(-max(len(row) - 1 for row in token_rows) // TOKEN_BUCKET) * TOKEN_BUCKET
        token_inputs = torch.full((len(token_rows), width), BOE_ID, dtype=torch.long)
        token_targets = torch.full((len(token_rows), width), IGNORE_INDEX, dtype=torch.long)
        for index, row in enumerate(token_rows):
            token_inputs[index, : len(row) - 1] = torch.tensor(row[:-1])
            token_targets[index, : len(row) - 1] = torch.tensor(row[1:])
        count = sum(len(row) - 1 for row in token_rows)
        return token_inputs.to(inputs.device), token_targets.to(inputs.device), count

    @staticmethod
    def _row_pieces(window: np.ndarray) -> list[int | bytes]:
        """The window after its first id as special ids and byte strings between them."""
        rest = window[1:]
        specials = np.flatnonzero(rest < SPECIAL_IDS).tolist()
        pieces: list[int | bytes] = []
        start = 0
        for position in [*specials, len(rest)]:
            if position > start:
                pieces.append((rest[start:position] - BYTE_OFFSET).astype(np.uint8).tobytes())
            if position < len(rest):
                pieces.append(int(rest[position]))
            start = position + 1
        return pieces


def prepare_run_tokenizer(cfg: Config, train_sources) -> Path:
    """``output_dir/tokenizer.json`` of a tokenlm run: copied from ``checkpoint.init_from`` when that model
    directory has one, else trained on the training split. ``tokenizer_origin.json`` beside it says what
    it was made from; a run that finds both (a resume) keeps the tokenizer only when it would make the
    same one now, and otherwise stops with a UserError naming what changed.
    Every rank may call it: training is deterministic and the files are written atomically, the origin first."""
    path = Path(cfg.output_dir) / TOKENIZER_FILE
    inherited = Path(cfg.checkpoint.init_from or "") / TOKENIZER_FILE
    copied = bool(cfg.checkpoint.init_from) and inherited.is_file()
    sample = [] if copied else training_sample(train_sources, cfg.model.tokenlm.sample_bytes)
    origin = {"copied_from": str(inherited)} if copied else sample_origin(cfg, sample)
    if path.is_file():
        check_origin(path, origin)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path.with_name(ORIGIN_FILE), json.dumps(origin, indent=2) + "\n")
    if copied:
        with atomic_file(path) as staging:
            shutil.copyfile(inherited, staging)
    else:
        atomic_write(path, train_bpe(sample, cfg.model.tokenlm.vocab_size).to_str())
    return path


def sample_origin(cfg: Config, sample: list[bytes]) -> dict:
    """What a tokenizer trained on ``sample`` is made from: the vocabulary size and the sample's digest
    decide it; the settings that chose the sample are kept to name what changed."""
    digest = hashlib.sha256()
    for document in sample:  # lengths too: BPE never merges across documents
        digest.update(len(document).to_bytes(8, "little") + document)
    settings = {"model.tokenlm.vocab_size": cfg.model.tokenlm.vocab_size,
                "model.tokenlm.sample_bytes": cfg.model.tokenlm.sample_bytes, "data.path": cfg.data.path,
                "data.sources": [dataclasses.asdict(source) for source in cfg.data.sources],
                "data.val_fraction": cfg.data.val_fraction}  # fmt: skip
    return {"vocab_size": cfg.model.tokenlm.vocab_size, "sample_sha256": digest.hexdigest(),
            "sample_documents": len(sample), "sample_length": sum(map(len, sample)), "settings": settings}  # fmt: skip


def check_origin(path: Path, origin: dict) -> None:
    """A UserError unless the kept tokenizer at ``path`` was made from ``origin``."""
    origin_path = path.with_name(ORIGIN_FILE)
    advice = ("resume with the data, model.tokenlm and checkpoint.init_from settings it was made from, or start a "
              f"new output_dir (before the run's first checkpoint, deleting {path.name} and {ORIGIN_FILE} trains it again)")  # fmt: skip
    try:
        saved = json.loads(origin_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}: kept from before, but {origin_path} (what it was made from) is missing or "
                        f"unreadable, so this run cannot tell it fits its training split; {advice}") from None  # fmt: skip
    changes = origin_changes(saved, origin)
    if changes:
        raise UserError(f"{path}: cannot be reused, it was made from other text or settings ({'; '.join(changes)}); "
                        + advice)  # fmt: skip


def origin_changes(saved: dict, current: dict) -> list[str]:
    """What differs between the origin a tokenizer was made from and the one this run would make it from;
    empty when both make the same tokenizer."""
    decisive = ("copied_from", "vocab_size", "sample_sha256")
    if all(saved.get(key) == current.get(key) for key in decisive):
        return []
    if "copied_from" in saved or "copied_from" in current:
        def made(origin):
            return f"a copy of {origin['copied_from']}" if "copied_from" in origin else "trained on the training split"

        return [f"{made(saved)} -> {made(current)}"]
    was = saved.get("settings", {})
    changes = [f"{name} {was.get(name)!r} -> {value!r}" for name, value in current["settings"].items()
               if was.get(name) != value]  # fmt: skip
    if saved.get("sample_sha256") != current["sample_sha256"]:
        changes.append(f"training sample of {saved.get('sample_documents')} documents, {saved.get('sample_length')} "
                       f"bytes, sha256 {str(saved.get('sample_sha256'))[:12]} -> {current['sample_documents']} "
                       f"documents, {current['sample_length']} bytes, sha256 {current['sample_sha256'][:12]}")  # fmt: skip
    return changes


def load_run_tokenizer(cfg: Config) -> BPETokenizer:
    """The tokenizer of a tokenlm run; a UserError naming the file when it is missing or does not fit."""
    path = Path(cfg.output_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; a tokenlm run trains it before the start (bltdist.train), or copy "
                        "the tokenizer.json of the model directory you start from")  # fmt: skip
    tokenizer = BPETokenizer.from_file(path)
    if tokenizer.vocab_size > cfg.model.tokenlm.vocab_size:
        raise UserError(
            f"{path}: has {tokenizer.vocab_size} tokens, more than model.tokenlm.vocab_size = "
            f"{cfg.model.tokenlm.vocab_size}; set model.tokenlm.vocab_size to {tokenizer.vocab_size}"
        )
    return tokenizer
