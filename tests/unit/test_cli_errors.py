"""User errors on the command line: one `error:` line naming the field / file / directory, exit code 2,
no traceback (the config, the run directory, a model directory without a tokenizer)."""

from __future__ import annotations

import re
from pathlib import Path

from megatron_oapl import cli

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _error_line(capsys) -> str:
    """The one line of stderr that is not a log record (status lines such as "evaluating ..." are)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not re.match(r"\d\d:\d\d:\d\d \[oapl\] ", line)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_train_config_error_is_one_line(capsys):
    assert cli.main(["train", TINY, "algo.beta2=-1"]) == 2
    assert _error_line(capsys) == "error: algo.beta2=-1.0 must be > 0"


def test_run_dir_that_is_a_file_is_refused_naming_the_field(tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("not a run")
    assert cli.main(["config", "show", TINY, f"run_dir={taken}"]) == 2
    assert _error_line(capsys).startswith(f"error: run_dir={str(taken)!r} is an existing file")
    assert cli.main(["train", TINY, f"run_dir={taken}/run"]) == 2
    assert f"run_dir={str(taken / 'run')!r} is inside {str(taken)!r}" in _error_line(capsys)


def test_eval_of_a_model_without_tokenizer_says_so_and_ignores_the_configs_model(tmp_path, capsys, monkeypatch):
    """The model directory has config.json and no tokenizer files (a checkpoint exported without them):
    transformers builds an empty Qwen2 tokenizer from config.json alone, which used to surface as
    "prompt 0 is empty". The config's own model.hf_path (relative: runs/tiny-model) does not exist here
    and must not be read when --model is given."""
    from transformers import Qwen2Config

    model = tmp_path / "exported"
    Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True).save_pretrained(model)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", TINY, "--model", str(model), "model.preset=qwen2", "data.num_eval_prompts=4"]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {model} holds no tokenizer") and "copy the tokenizer files" in line, line
