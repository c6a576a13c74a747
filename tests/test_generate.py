"""Generation: byte-by-byte patch boundaries, cached inference equal to recomputing, sampling, the command."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_convert import VARIANTS, saved_hf_blt
from test_model import build, tiny_blt_config

from bltdist.config import SuperPatchConfig, load_config
from bltdist.convert import from_hf
from bltdist.evaluate import NOISE_KINDS, noised
from bltdist.evaluate import main as evaluate_main
from bltdist.generate import CachedStepper, RecomputeStepper, generate, load_for_generation, main, rule_settings
from bltdist.model import ByteLM
from bltdist.model_dir import save_weights_dir
from bltdist.patching.online import OnlineBoundaries
from bltdist.patching.rules import patch_starts

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
ENTROPY_CONTEXT = 16  # short, so that generation crosses the entropy model's chunk boundaries
# Prompts of different lengths; with local_window 8 the longest run through several windows.
PROMPTS = [b"", b"a", "caf\u00e9 au lait".encode(), b"def f(x):\n    return x + 1  # one more\n"]
PATCHINGS = {
    "static": ["--patching.mode=static", "--patching.patch_size=3"],
    "static_max": ["--patching.mode=static", "--patching.patch_size=5", "--patching.max_patch_length=2"],
    "space": ["--patching.mode=space"],
    "space_max": ["--patching.mode=space", "--patching.max_patch_length=3"],
    "entropy_global": ["--patching.mode=entropy", "--patching.threshold=3.9"],
    "entropy_monotonic": ["--patching.mode=entropy", "--patching.threshold_mode=monotonic",
                          "--patching.threshold=0.0", "--patching.max_patch_length=4"],
}  # fmt: skip


def save_entropy_model(directory: Path) -> Path:
    cfg = load_config(None, ["--model.arch=entropy", "--model.entropy.dim=16", "--model.entropy.layers=2",
                             "--model.entropy.heads=2", "--model.entropy.ffn_dim=32", "--model.entropy.window=6", "--model.entropy.init_std=0.5",
                             f"--train.seq_len={ENTROPY_CONTEXT}"])  # fmt: skip
    model = build(cfg.model.entropy, ByteLM)
    return save_weights_dir(model.state_dict(), cfg, directory)


def save_blt(directory: Path, patching: list[str], entropy_dir: Path | None = None, **shape) -> Path:
    """A tiny random BLT model directory patching by ``patching`` (config overrides)."""
    overrides = [*patching] + ([f"--patching.entropy_model={entropy_dir}"] if entropy_dir else [])
    cfg = load_config(None, overrides)
    cfg.model.blt = tiny_blt_config(**shape)
    return save_weights_dir(build(cfg.model.blt).state_dict(), cfg, directory)


@pytest.fixture(scope="module")
def entropy_dir(tmp_path_factory) -> Path:
    return save_entropy_model(tmp_path_factory.mktemp("entropy") / "model")


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory) -> Path:
    return save_blt(tmp_path_factory.mktemp("static") / "model", PATCHINGS["static"])


@pytest.mark.parametrize("name", PATCHINGS)
def test_online_boundaries_give_patch_starts_of_the_next_position(name):
    cfg = load_config(None, PATCHINGS[name] + (["--patching.entropy_model=x"] if "entropy" in name else []))
    generator = torch.Generator().manual_seed(1)
    alphabet = torch.tensor(list(b"ab1 .\n\xc3\xa9"), dtype=torch.long) + 4  # words, spaces and UTF-8
    for _ in range(4):
        tokens = alphabet[torch.randint(len(alphabet), (1, 120), generator=generator)]
        tokens[0, 0] = 1
        entropies = 5.5 + 0.1 * torch.randn(tokens.shape, generator=generator)
        expected = patch_starts(tokens, cfg.patching.mode, entropies=entropies, **rule_settings(cfg.patching))
        rule = OnlineBoundaries(cfg.patching.mode, **rule_settings(cfg.patching))
        observed = [rule.observe(int(token), float(entropy)) for token, entropy in zip(tokens[0], entropies[0])]
        assert observed[:-1] == expected[0, 1:].tolist()


def assert_steps_agree(model, patching, entropy_model, tokens: list[int], prompt_length: int,
                       atol: float = 1e-5) -> None:  # fmt: skip
    """Logits of the cached and the recomputing stepper agree on a prompt and then byte by byte, and
    each step's logits are those of its position in one training forward over the whole sequence."""
    cached = CachedStepper(model, patching, entropy_model)
    recomputed = RecomputeStepper(model, patching, entropy_model)
    pairs = [(cached.advance(tokens[:prompt_length]), recomputed.advance(tokens[:prompt_length]))]
    pairs += [(cached.advance([token]), recomputed.advance([token])) for token in tokens[prompt_length:]]
    whole_sequence = recomputed.logits()[prompt_length - 1 :]
    for step, (fast, reference) in enumerate(pairs):
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=atol, msg=f"step {step}")
        torch.testing.assert_close(fast, whole_sequence[step], rtol=1e-5, atol=atol, msg=f"step {step}")
    window = model.cfg.local_window
    local_caches = cached.blt.encoder_caches + cached.blt.decoder_caches
    assert window is None or all(cache.keys.shape[1] == min(window - 1, len(tokens)) for cache in local_caches)


@pytest.mark.parametrize("name", PATCHINGS)
def test_cached_generation_equals_recomputing_the_sequence(name, tmp_path, entropy_dir):
    model_dir = save_blt(tmp_path / "model", PATCHINGS[name], entropy_dir if "entropy" in name else None)
    model, patching, entropy_model = load_for_generation(model_dir)
    options = dict(max_new_bytes=40, temperature=0)
    cached = generate(model, PROMPTS, patching, entropy_model, **options)
    assert cached == generate(model, PROMPTS, patching, entropy_model, use_cache=False, **options)
    assert max(len(new) for new in cached) == 40  # a greedy row may end early at EOS
    tokens = [1] + [byte + 4 for byte in PROMPTS[-1] + cached[-1]]
    assert_steps_agree(model, patching, entropy_model, tokens, prompt_length=5)


@pytest.mark.parametrize(
    "shape",
    [
        {"encoder_cross_attn_all_layers": True, "encoder_cross_attn_repool": True, "cross_attn_k": 3},
        {"encoder_cross_attn_all_layers": True, "decoder_cross_attn_all_layers": False, "local_window": None},
        {"global_final_norm": False, "cross_attn_double_residual": True, "local_window": 3, "hash_ngram_sizes": [2, 6]},
    ],
)
def test_cached_steps_equal_recomputing_for_other_model_shapes(shape, tmp_path):
    model, patching, _ = load_for_generation(save_blt(tmp_path / "model", PATCHINGS["space_max"], **shape))
    tokens = [1] + [byte + 4 for byte in b"for i in range(10):\n    print(i, i * i)  # squares"]
    assert_steps_agree(model, patching, None, tokens, prompt_length=1)
    assert_steps_agree(model, patching, None, tokens, prompt_length=20)


@pytest.mark.parametrize("grouping", [
    {"patches_per_super_patch": 2},
    {"mode": "entropy", "entropy_threshold": 14.0, "max_patches_per_super_patch": 3},
], ids=["static", "entropy"])  # fmt: skip
def test_a_two_level_model_generates_by_recomputing_and_appended_bytes_change_no_earlier_logit(grouping, tmp_path,
                                                                                             entropy_dir):  # fmt: skip
    """Caches cover one latent level, so a model with super-patches recomputes; the second level's
    one-step lag keeps every step's logits those of its position in the whole sequence."""
    super_patch = SuperPatchConfig(enabled=True, **grouping)
    entropy = "entropy" in grouping.get("mode", "")
    patching = PATCHINGS["entropy_global" if entropy else "static"]
    model_dir = save_blt(tmp_path / "model", patching, entropy_dir if entropy else None, super_patch=super_patch)
    model, patching, entropy_model = load_for_generation(model_dir)
    new = generate(model, [PROMPTS[-1]], patching, entropy_model, max_new_bytes=16, temperature=0)[0]
    assert len(new) > 0
    tokens = [1] + [byte + 4 for byte in PROMPTS[-1] + new]
    stepper = RecomputeStepper(model, patching, entropy_model)
    steps = [stepper.advance(tokens[:5])] + [stepper.advance([token]) for token in tokens[5:]]
    whole_sequence = stepper.logits()[4:]
    for step, logits in enumerate(steps):
        torch.testing.assert_close(logits, whole_sequence[step], rtol=1e-5, atol=1e-5, msg=f"step {step}")
    (tmp_path / "code.py").write_text("def f(x):\n    return x * 2\n" * 20)
    evaluate_main([str(model_dir), "--data", str(tmp_path / "code.py"), "--seq-len", "64", "--out",
                   str(tmp_path / "eval.json")])  # fmt: skip
    assert 7 < json.loads((tmp_path / "eval.json").read_text())["sources"]["code.py"]["bpb"] < 9  # untrained


def test_the_last_byte_reads_the_last_completed_patch_not_the_open_one(static_dir):
    """The reference is not the plain forward: where the last patch is still open, they differ."""
    model, patching, _ = load_for_generation(static_dir)
    tokens = [1] + [byte + 4 for byte in b"abcdefg"]  # static 3: [BOS] abc def g -> "g" opens a patch
    plain = model(torch.tensor([tokens]), torch.tensor([[1, 3, 3, 1]]))[0, -1]
    reference = RecomputeStepper(model, patching, None).advance(tokens)
    assert not torch.allclose(plain, reference)
    torch.testing.assert_close(CachedStepper(model, patching, None).advance(tokens), reference)


def test_sampling_is_reproducible_from_the_seed(static_dir):
    model, patching, _ = load_for_generation(static_dir)

    def sample(seed, **options):
        return generate(model, [b"abc", b"xyz"], patching, max_new_bytes=24, seed=seed, **options)

    first = sample(3, temperature=1.5, top_p=0.9)
    assert first == sample(3, temperature=1.5, top_p=0.9)
    assert first != sample(4, temperature=1.5, top_p=0.9)
    assert first[0] != first[1]
    # A nucleus this small keeps only the most likely byte: sampling is greedy.
    assert sample(5, temperature=1.0, top_p=1e-6) == sample(6, temperature=0)


def test_command_streams_the_new_text(static_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(static_dir), "--prompt", "hello", "--max-new-bytes", "12", "--temperature", "0"]
    result = subprocess.run([sys.executable, "-m", "bltdist.generate", *args], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    model, patching, _ = load_for_generation(static_dir)
    expected = generate(model, [b"hello"], patching, max_new_bytes=12, temperature=0)[0]
    assert result.stdout == expected.decode("utf-8", errors="backslashreplace") + "\n"


def test_bad_input_exits_2_naming_it(tmp_path, static_dir, entropy_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    missing_entropy = save_blt(tmp_path / "needs_entropy", PATCHINGS["entropy_global"], tmp_path / "gone")
    cases = [
        ([str(tmp_path / "nothing"), "--prompt", "hi"], [str(tmp_path / "nothing"), "not a bltdist model directory"]),
        ([str(static_dir), "--prompt-file", str(empty)], ["--prompt-file", str(empty), "empty"]),
        ([str(entropy_dir), "--prompt", "hi"], [str(entropy_dir), "entropy model"]),
        ([str(missing_entropy), "--prompt", "hi"], ["patching.entropy_model", str(tmp_path / "gone")]),
        ([str(static_dir), "--prompt", "hi", "--temperature", "-1"], ["--temperature"]),
        ([str(static_dir), "--prompt", "hi", "--top-p", "0"], ["--top-p"]),
    ]
    for args, fragments in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2, (args, stderr)
        for fragment in fragments:
            assert fragment in stderr, (fragment, stderr)


# Evaluation


def test_noise_is_seeded_and_does_what_its_name_says():
    text = "Hello, World \u00e9t\u00e9 \xff".encode("utf-8", errors="surrogateescape") + b"\xff"
    for kind in NOISE_KINDS:
        assert noised(text, kind, 0.0, random.Random(0)) == text
        assert noised(text, kind, 0.5, random.Random(1)) == noised(text, kind, 0.5, random.Random(1))
    assert noised(text, "drop", 1.0, random.Random(0)) == b""
    assert noised(b"abc", "repeat", 1.0, random.Random(0)) == b"aabbcc"
    assert noised(b"abcd", "swap", 1.0, random.Random(0)) == b"badc"
    assert noised("Ab\u00e9".encode(), "case", 1.0, random.Random(0)) == "aB\u00c9".encode()


def test_evaluate_writes_figures_per_source(tmp_path, static_dir, capsys):
    (tmp_path / "prose.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "f.py").write_text("def f(x):\n    return x * 2\n" * 20)
    out = tmp_path / "eval.json"
    evaluate_main([str(static_dir), "--data", f"prose={tmp_path / 'prose.txt'}", "--data", str(tmp_path / "code"),
                   "--seq-len", "64", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    assert json.loads(printed.splitlines()[-1]) == summary
    assert set(summary["sources"]) == {"prose", "code"} and "prose" in printed.splitlines()[1]
    for row in summary["sources"].values():
        assert 7.5 < row["bpb"] < 8.5  # an untrained model: about log2(260) bits per byte
        assert 2.5 < row["avg_patch_len"] <= 3  # static patches of 3, shorter after every BOS
        assert row["flops_per_byte"] > 0 and all(0 < row[f"bpb_{kind}"] < 9 for kind in NOISE_KINDS)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([str(static_dir), "--data", str(tmp_path / "missing.txt")])
    assert exit_info.value.code == 2 and str(tmp_path / "missing.txt") in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["k1-gqa-projection", "k2-two-functions-encoder-all-layers"])
def test_a_converted_hugging_face_model_generates_as_it_recomputes(variant, tmp_path):
    """The released models' options (no global final norm, the doubled cross-attention residual,
    re-pooled encoder slots) and their entropy model, converted from the port's format."""
    _, hf_dir = saved_hf_blt(tmp_path, VARIANTS[variant], with_patcher=True)
    model, patching, entropy_model = load_for_generation(from_hf(hf_dir, tmp_path / "converted"))
    assert patching.mode == "entropy" and entropy_model is not None
    options = dict(max_new_bytes=24, temperature=0)
    cached = generate(model, PROMPTS, patching, entropy_model, **options)
    assert cached == generate(model, PROMPTS, patching, entropy_model, use_cache=False, **options)
    tokens = [1] + [byte + 4 for byte in PROMPTS[-1] + cached[-1]]
    # The test weights are perturbed by 0.1 per element, so logits run larger than a trained
    # model's: rounding from the cached and the whole-sequence summation orders reaches ~3e-5.
    assert_steps_agree(model, patching, entropy_model, tokens, prompt_length=5, atol=1e-4)
