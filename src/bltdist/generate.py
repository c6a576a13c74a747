"""Text generation from a BLT model directory: ``python -m bltdist.generate MODEL_DIR --prompt TEXT``.

Patches are decided byte by byte with the model's training rule (its config's ``patching``
section, the entropy model included), and every prediction is the one the training forward gives
that position inside a longer sequence (BLT_NOTES section 7). ``generate`` runs on key/value
caches (``bltdist.model.incremental``); ``use_cache=False`` recomputes the whole sequence with the
training forward at every step instead, the reference the caches are tested against (and the path
of two-level models, `model.blt.super_patch`: the caches cover one latent level). New text is
streamed to stdout, bytes that are not valid UTF-8 escaped; bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bltdist.config import PatchingConfig, load_config
from bltdist.errors import ConfigError, UserError
from bltdist.model import BLT
from bltdist.model.incremental import IncrementalBLT, IncrementalByteLM
from bltdist.model_dir import CONFIG_FILE, WEIGHTS_FILE, load_pretrained
from bltdist.patching.entropy import EntropyModel
from bltdist.patching.online import OnlineBoundaries
from bltdist.patching.rules import entropy_super_patch_lengths, patch_lengths, patch_starts
from bltdist.patching.tokens import BOS_ID, BYTE_OFFSET, EOS_ID

PROGRAM = "python -m bltdist.generate"
NEVER_GENERATED = (0, BOS_ID, 3)  # padding, BOS and the reserved id: a generated BOS would start a document


def rule_settings(patching: PatchingConfig) -> dict:
    """The keyword arguments of ``patch_starts`` and ``OnlineBoundaries`` besides mode and entropies."""
    return dict(
        patch_size=patching.patch_size,
        threshold=patching.threshold,
        threshold_mode=patching.threshold_mode,
        max_patch_length=patching.max_patch_length,
    )


class CachedStepper:
    """Next-byte logits of a growing sequence from key/value caches."""

    def __init__(self, model: BLT, patching: PatchingConfig, entropy_model: EntropyModel | None):
        self.blt = IncrementalBLT(model)
        self.boundaries = OnlineBoundaries(patching.mode, **rule_settings(patching))
        self.entropies = None
        if entropy_model is not None:
            self.entropies = IncrementalByteLM(entropy_model.network, entropy_model.context)

    def advance(self, tokens: list[int]) -> torch.Tensor:
        entropies = [None] * len(tokens) if self.entropies is None else self.entropies.advance(tokens)
        closes = [self.boundaries.observe(token, entropy) for token, entropy in zip(tokens, entropies)]
        return self.blt.advance(tokens, closes)


class RecomputeStepper:
    """The reference: the training forward on the whole sequence at every step.

    A stand-in byte is appended before patching, so the rule itself decides whether it starts a
    patch; the last real byte then reads the patch that ends at or before it, not the open one (the
    forward's own rule that the sequence end closes a patch holds for training's last byte only).
    Causality keeps the stand-in out of every earlier logit.
    """

    def __init__(self, model: BLT, patching: PatchingConfig, entropy_model: EntropyModel | None):
        self.model, self.patching, self.entropy_model = model, patching, entropy_model
        self.tokens: list[int] = []

    def advance(self, tokens: list[int]) -> torch.Tensor:
        self.tokens += tokens
        return self.logits()[-1]

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """Logits (T, vocab) of every position of the sequence so far, from one training forward."""
        row = torch.tensor([self.tokens + [BYTE_OFFSET]], device=self.model.decoder.output.weight.device)
        entropies = None
        if self.entropy_model is not None:  # chunk by chunk, as training computes them
            context, network = self.entropy_model.context, self.entropy_model.network
            chunks = [network.entropies(row[:, i : i + context]) for i in range(0, row.shape[1], context)]
            entropies = torch.cat(chunks, dim=1)
        lengths = patch_lengths(patch_starts(row, self.patching.mode, entropies=entropies, **rule_settings(self.patching)))
        grouped = entropy_super_patch_lengths(self.model.cfg.super_patch, row, lengths, entropies)
        return self.model(row, lengths, super_patch_lengths=grouped)[0, :-1]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """A byte id (or EOS) from fp32 logits (vocab,): greedy at temperature 0, else nucleus sampling."""
    logits = logits.detach().float().cpu().clone()  # on the CPU, where the seeded generator draws
    logits[list(NEVER_GENERATED)] = -torch.inf
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= top_p  # the mass before a byte already reaches top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: BLT,
    prompts: Sequence[bytes | str],
    patching: PatchingConfig,
    entropy_model: EntropyModel | None = None,
    *,
    max_new_bytes: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    on_bytes: Callable[[int, bytes], None] | None = None,
) -> list[bytes]:
    """New bytes for each prompt (until EOS or ``max_new_bytes``); prompt i samples from seed + i.

    ``model`` and the patching come from ``load_for_generation`` (or ``bltdist.load_pretrained`` plus
    the model's ``patching`` settings); ``on_bytes(i, new)`` is called as prompt i's bytes appear.
    """
    # The caches cover one latent level: a two-level model (model.blt.super_patch) recomputes.
    stepper_class = CachedStepper if use_cache and not model.cfg.super_patch.enabled else RecomputeStepper
    outputs = []
    for row, prompt in enumerate(prompts):
        prompt = prompt.encode() if isinstance(prompt, str) else prompt
        stepper = stepper_class(model, patching, entropy_model)
        generator = torch.Generator().manual_seed(seed + row)
        logits = stepper.advance([BOS_ID] + [byte + BYTE_OFFSET for byte in prompt])
        new = bytearray()
        while len(new) < max_new_bytes:
            token = sample_next(logits, temperature, top_p, generator)
            if token == EOS_ID:
                break
            new.append(token - BYTE_OFFSET)
            if on_bytes is not None:
                on_bytes(row, bytes([token - BYTE_OFFSET]))
            if len(new) < max_new_bytes:
                logits = stepper.advance([token])
        outputs.append(bytes(new))
    return outputs


def load_for_generation(model_dir: str | Path) -> tuple[BLT, PatchingConfig, EntropyModel | None]:
    """The BLT of a model directory, its patching settings and, in entropy mode, its entropy model."""
    directory = Path(model_dir)
    if not (directory / CONFIG_FILE).is_file():
        raise UserError(f"{directory}: not a bltdist model directory (no {CONFIG_FILE}); give a BLT model directory")
    try:
        cfg = load_config(str(directory / CONFIG_FILE), [])
    except ConfigError as error:
        raise UserError(f"{directory / CONFIG_FILE}: {error}") from error
    if cfg.model.arch != "blt":
        raise UserError(
            f"{directory} holds a model.arch: {cfg.model.arch} model; generation and evaluation take a BLT "
            "(model.arch: blt) model directory (baselines report held-out bpb through bltdist.train's eval.sets)"
        )
    model = load_pretrained(directory)
    entropy_model = None
    if cfg.patching.mode == "entropy":
        path = Path(cfg.patching.entropy_model)
        if not path.is_absolute() and not path.exists() and (directory / path).exists():
            path = directory / path  # a path written relative to the model directory
        entropy_model = EntropyModel(path, key=f"{directory / CONFIG_FILE}: patching.entropy_model")
        _ = entropy_model.network  # loads the weights now, so that a bad file is reported before generating
    return model, cfg.patching, entropy_model


def read_prompt(args: argparse.Namespace) -> bytes:
    if args.prompt_file is None:
        return args.prompt.encode()
    path = Path(args.prompt_file)
    if not path.is_file():
        raise UserError(f"--prompt-file: {path} not found")
    prompt = path.read_bytes()
    if not prompt:
        raise UserError(f"--prompt-file: {path} is empty; give a file holding the prompt")
    return prompt


def _bounded(kind: type, low: float, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str):
        value = kind(text)
        if value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", help=f"a BLT model directory ({CONFIG_FILE} + {WEIGHTS_FILE})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text (UTF-8)")
    source.add_argument("--prompt-file", help="a file whose bytes are the prompt")
    parser.add_argument("--max-new-bytes", type=_bounded(int, 0), default=256, help="bytes to generate at most")
    parser.add_argument("--temperature", type=_bounded(float, 0), default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=_bounded(float, 0, 1, low_open=True), default=1.0, help="nucleus mass, (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        prompt = read_prompt(args)
        model, patching, entropy_model = load_for_generation(args.model_dir)
    except UserError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        sys.exit(2)
    text = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")  # holds a character's first bytes

    def stream(row: int, new: bytes) -> None:
        sys.stdout.write(text.decode(new))
        sys.stdout.flush()

    try:
        generate(model, [prompt], patching, entropy_model, max_new_bytes=args.max_new_bytes,
                 temperature=args.temperature, top_p=args.top_p, seed=args.seed, on_bytes=stream)  # fmt: skip
        sys.stdout.write(text.decode(b"", final=True) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, with nothing more flushed to the pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
