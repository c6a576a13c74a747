from pathlib import Path

import pytest

from bltdist.config import (
    Config,
    config_to_dict,
    load_config,
    parse_args,
    save_config,
    validate,
)
from bltdist.errors import ConfigError
from bltdist.parallel import ParallelDims

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def problems_of(path: str | None, overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return caught.value.problems


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_validate():
    validate(Config())
    assert load_config(None, []) == Config()


def test_configs_directory_holds_the_documented_files():
    assert {path.name for path in CONFIGS} >= {
        "tiny.yaml", "tiny_static.yaml", "blt_1b.yaml", "blt_7b.yaml", "entropy_tiny.yaml", "entropy_100m.yaml"
    }  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(str(path), [])
    validate(cfg)
    assert cfg.output_dir.startswith("runs/")


def test_released_shapes():
    blt_1b = load_config(str(CONFIG_DIR / "blt_1b.yaml"), []).model.blt
    assert (blt_1b.local_dim, blt_1b.global_dim, blt_1b.global_layers, blt_1b.decoder_layers) == (1024, 2048, 25, 9)
    assert (blt_1b.encoder_ffn_dim, blt_1b.decoder_ffn_dim, blt_1b.global_ffn_dim) == (2816, 2816, 5632)
    entropy = load_config(str(CONFIG_DIR / "entropy_100m.yaml"), []).model.entropy
    assert (entropy.layers, entropy.dim, entropy.heads, entropy.ffn_dim, entropy.window) == (14, 768, 12, 2048, 512)


def test_yaml_may_give_part_of_a_section(tmp_path):
    cfg = load_config(write_yaml(tmp_path, "optim:\n  lr: 0.01\nmodel:\n  blt:\n    local_dim: 64\n"), [])
    assert cfg.optim.lr == 0.01 and cfg.optim.beta2 == 0.95
    assert cfg.model.blt.local_dim == 64 and cfg.model.blt.global_dim == 512


def test_both_override_forms_mix_and_later_wins():
    cfg = load_config(None, ["--optim.lr", "0.001", "--train.steps=5", "--output_dir", "runs/x", "--train.steps=7"])
    assert (cfg.optim.lr, cfg.train.steps, cfg.output_dir) == (0.001, 7, "runs/x")


def test_scientific_notation_in_overrides_and_yaml(tmp_path):
    cfg = load_config(write_yaml(tmp_path, "optim:\n  lr: 3e-4\n  eps: 1E-6\n"), ["--model.blt.norm_eps=1e-6"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.eps == pytest.approx(1e-6) and cfg.model.blt.norm_eps == pytest.approx(1e-6)


def test_ints_and_bools_are_typed():
    cfg = load_config(None, ["--optim.lr=1", "--train.compile", "true", "--model.blt.rope_theta", "10000"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.compile is True and isinstance(cfg.model.blt.rope_theta, float)


def test_null_for_optional_and_list_override():
    overrides = [
        "--model.blt.local_window=null", "--model.blt.hash_ngram_sizes", "[3, 4]", "--patching.max_patch_length=8"
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    assert cfg.model.blt.local_window is None
    assert cfg.model.blt.hash_ngram_sizes == [3, 4]
    assert cfg.patching.max_patch_length == 8


def test_string_fields_keep_the_text_as_typed():
    cfg = load_config(None, ["--data.path", "*.jsonl", "--output_dir=2024", "--data.text_field=1.10"])
    assert (cfg.data.path, cfg.output_dir, cfg.data.text_field) == ("*.jsonl", "2024", "1.10")
    assert load_config(None, ["--data.path=null"]).data.path is None


def test_unknown_keys_at_every_level_with_hints(tmp_path):
    problems = problems_of(
        write_yaml(tmp_path, "optimizer: {}\noptim:\n  lrr: 0.1\n  steps: 3\nmodel:\n  blt:\n    local_dims: 64\n"),
        ["--train.stepz=3", "--lr=0.1"],
    )
    assert "optimizer: unknown key; did you mean optim?" in problems
    assert "optim.lrr: unknown key; did you mean optim.lr?" in problems
    assert "optim.steps: unknown key; did you mean train.steps?" in problems
    assert "model.blt.local_dims: unknown key; did you mean model.blt.local_dim?" in problems
    assert "train.stepz: unknown key; did you mean train.steps?" in problems
    assert "lr: unknown key; did you mean optim.lr?" in problems


def test_unknown_key_without_a_close_match_lists_the_known_keys():
    (problem,) = problems_of(None, ["--checkpoint.zzzzzz=1"])
    assert problem.startswith("checkpoint.zzzzzz: unknown key; known keys in checkpoint: interval, init_from")


def test_wrong_types():
    problems = problems_of(
        None,
        ["--train.steps=3.5", "--optim.lr=fast", "--train.compile=1", "--model.blt.hash_ngram_sizes=[3, x]",
         "--optim", "5"],
    )  # fmt: skip
    assert "train.steps: expected an integer, got 3.5" in problems
    assert "optim.lr: expected a number, got 'fast'" in problems
    assert "train.compile: expected a boolean (true/false), got 1" in problems
    assert "model.blt.hash_ngram_sizes: expected a list of integers, got [3, 'x']" in problems
    assert "optim: expected a mapping of keys, got 5" in problems


def test_quoted_integer_in_yaml_is_accepted(tmp_path):
    assert load_config(write_yaml(tmp_path, 'train:\n  steps: "3"\n'), []).train.steps == 3


def test_negative_lr():
    assert problems_of(None, ["--optim.lr=-0.001"]) == ["optim.lr: must be > 0, got -0.001"]


def test_enum_problem_suggests_the_close_choice():
    (problem,) = problems_of(None, ["--optim.schedule=cosin"])
    assert problem == "optim.schedule: must be one of cosine, wsd, constant, got 'cosin'; did you mean cosine?"


def test_every_problem_is_reported_at_once(tmp_path):
    problems = problems_of(
        write_yaml(tmp_path, "optim:\n  lr: -1\n  beta2: 1.0\nunknown_section: 3\n"),
        ["--train.steps=0", "--train.seq_len=1", "--model.blt.local_heads=3", "--data.val_fraction=1",
         "--model.blt.hash_ngram_sizes=[1, 3, 3]", "--parallel.tp=0", "--train.micro_batch_size", "x"],
    )  # fmt: skip
    prefixes = sorted(problem.split(":")[0] for problem in problems)
    assert prefixes == sorted([
        "unknown_section", "train.micro_batch_size",
        "model.blt.local_heads", "data.val_fraction", "optim.lr", "optim.beta2", "train.steps", "train.seq_len",
        "parallel.tp", "model.blt.hash_ngram_sizes", "model.blt.hash_ngram_sizes",
    ])  # fmt: skip
    assert "model.blt.local_heads: must divide model.blt.local_dim (256), got 3" in problems
    assert "data.val_fraction: must be in [0, 1), got 1.0" in problems


def test_heads_and_kv_heads_shapes():
    problems = problems_of(None, ["--model.entropy.kv_heads=5", "--model.blt.local_heads=256"])
    assert "model.entropy.kv_heads: must divide model.entropy.heads (12), got 5" in problems
    assert any(problem.startswith("model.blt.local_heads: head size") for problem in problems)


def test_global_batch_not_divisible_by_micro_batch():
    assert problems_of(None, ["--train.global_batch_size=10", "--train.micro_batch_size=4"]) == [
        "train.global_batch_size: must be divisible by train.micro_batch_size (4), got 10"
    ]


def test_checkpointing_interval_needs_checkpointing():
    assert problems_of(None, ["--train.activation_checkpointing_interval=2"]) == [
        "train.activation_checkpointing_interval: 2 chooses which blocks are checkpointed, but "
        "train.activation_checkpointing is false; set it to true, or leave the interval at 1"
    ]
    cfg = load_config(None, ["--train.activation_checkpointing_interval=2", "--train.activation_checkpointing=true"])
    assert cfg.train.activation_checkpointing_interval == 2


def test_entropy_patching_needs_an_entropy_model():
    (problem,) = problems_of(None, ["--patching.mode=entropy"])
    assert problem.startswith("patching.entropy_model: required when patching.mode is entropy")
    assert load_config(None, ["--patching.mode=entropy", "--patching.entropy_model=runs/e"]).patching.mode == "entropy"


def test_validate_catches_wrong_types_of_a_config_built_in_code():
    cfg = Config()
    cfg.train.steps = "5"
    cfg.optim.lr = -1.0
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    assert caught.value.problems == ["optim.lr: must be > 0, got -1.0", "train.steps: expected an integer, got '5'"]


def data_parallel_and_accumulation(cfg, world_size: int) -> tuple[int, int]:
    dims = ParallelDims.from_config(cfg, world_size)
    return dims.dp, dims.grad_accum_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size)


def test_world_layout():
    cfg = load_config(None, ["--train.global_batch_size=8", "--train.micro_batch_size=2"])
    assert data_parallel_and_accumulation(cfg, 4) == (4, 1)
    assert data_parallel_and_accumulation(cfg, 2) == (2, 2)
    hybrid = load_config(None, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--train.micro_batch_size=1"])
    assert data_parallel_and_accumulation(hybrid, 4) == (4, 2)


def test_validate_world_mismatches():
    cfg = load_config(None, ["--train.global_batch_size=8", "--train.micro_batch_size=4"])
    with pytest.raises(ConfigError) as caught:
        ParallelDims.from_config(cfg, 3)
    (problem,) = caught.value.problems
    assert problem.startswith("train.global_batch_size: 8 is not divisible by") and "multiple of 12" in problem

    fixed_shard = load_config(None, ["--parallel.dp_shard=2"])
    with pytest.raises(ConfigError) as caught:
        ParallelDims.from_config(fixed_shard, 4)
    assert caught.value.problems[0].startswith("parallel: ") and "4 process(es)" in caught.value.problems[0]

    rest = load_config(None, ["--parallel.dp_replicate=2"])
    with pytest.raises(ConfigError) as caught:
        ParallelDims.from_config(rest, 3)
    assert caught.value.problems[0].startswith("parallel.dp_shard: -1 takes the rest")


def test_save_and_load_round_trip(tmp_path):
    overrides = ["--optim.eps=1e-12", "--data.path=2024", "--model.blt.local_kv_heads=2"]
    cfg = load_config(str(CONFIG_DIR / "tiny.yaml"), overrides)
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(str(tmp_path / "out" / "config.yaml"), [])
    assert again == cfg
    assert config_to_dict(again)["model"]["blt"]["hash_ngram_sizes"] == [3, 4, 5, 6]


def test_parse_args_forms():
    assert parse_args([]) == (None, [])
    assert parse_args(["configs/tiny_static.yaml", "--train.steps", "3"]) == ("configs/tiny_static.yaml", ["--train.steps", "3"])
    assert parse_args(["--train.steps=3", "--config", "a.yaml"]) == ("a.yaml", ["--train.steps=3"])
    assert parse_args(["--config=a.yaml", "--optim.lr", "1e-3"]) == ("a.yaml", ["--optim.lr", "1e-3"])
    with pytest.raises(ConfigError):
        parse_args(["a.yaml", "--config", "b.yaml"])
    with pytest.raises(ConfigError):
        parse_args(["--config"])


def test_malformed_override_tokens():
    problems = problems_of(None, ["stray", "--train.steps"])
    assert problems[0].startswith("stray: unexpected argument")
    assert problems[1] == "train.steps: missing value after --train.steps"


def test_missing_config_file_is_a_config_error(tmp_path):
    (problem,) = problems_of(str(tmp_path / "absent.yaml"), [])
    assert problem.startswith("config: cannot read")


def test_help_lists_every_key_and_exits_zero(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["configs/tiny_static.yaml", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--optim.lr" in text and "0.0003" in text and "float" in text
    assert "--model.blt.hash_ngram_sizes" in text and "--parallel.pp_schedule" in text
