"""Data: reasoning-gym / JSONL / Parquet prompts, templates, and the tiny sentencepiece tokenizer."""

import json
import pickle
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_oapl.config import DataConfig
from megatron_oapl.data import (DataError, TEMPLATES, apply_template, encode_prompt, load_prompts,
                                load_tokenizer, render_prompt, stop_token_ids,
                                train_sentencepiece_tokenizer)

# 2 terms of 1 digit: only 10 * 10 * 2 = 200 distinct questions, so train and eval collide often.
SMALL_TASK = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def _rg(**kw) -> DataConfig:
    base = dict(source="reasoning_gym", task="chain_sum", task_kwargs=SMALL_TASK, seed=0,
                num_train_prompts=120, num_eval_prompts=40)
    return DataConfig(**{**base, **kw})


def _key(prompts):
    return [(p.prompt_id, p.text, p.answer, json.dumps(p.metadata, sort_keys=True)) for p in prompts]


# --- reasoning-gym ---------------------------------------------------------------------------------------

def test_reasoning_gym_splits_disjoint_and_deterministic():
    cfg = _rg()
    train, held_out = load_prompts(cfg, "train"), load_prompts(cfg, "eval")
    assert len(train) == 120 and len(held_out) == 40
    train_q = {p.text for p in train}
    eval_q = [p.text for p in held_out]
    assert not train_q & set(eval_q)
    assert len(set(eval_q)) == len(eval_q)
    assert _key(train) == _key(load_prompts(cfg, "train"))
    assert _key(held_out) == _key(load_prompts(cfg, "eval"))
    assert _key(train) != _key(load_prompts(_rg(seed=1), "train"))

    p = train[3]
    assert p.prompt_id == "chain_sum/train/3"
    assert re.fullmatch(r"chain_sum/eval/\d+", held_out[0].prompt_id)
    assert p.token_ids == [] and isinstance(p.answer, str)
    assert p.metadata["task"] == "chain_sum"
    assert p.metadata["entry_metadata"]["source_dataset"] == "chain_sum"
    json.dumps(p.metadata)
    assert pickle.loads(pickle.dumps(p)) == p


def test_reasoning_gym_config_errors():
    with pytest.raises(ValueError, match=r"data\.task='no_such_task'"):
        load_prompts(_rg(task="no_such_task"), "train")
    with pytest.raises(ValueError, match=r"data\.task_kwargs"):
        load_prompts(_rg(task_kwargs={"bogus": 1}), "train")
    with pytest.raises(ValueError, match=r"data\.source='csv'"):
        load_prompts(_rg(source="csv"), "train")
    with pytest.raises(ValueError, match=r"split='test'"):
        load_prompts(_rg(), "test")


# --- JSONL ---------------------------------------------------------------------------------------------

def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_jsonl_happy_path(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": "1 + 1 =", "answer": "2"},
        "",  # blank lines are skipped
        {"prompt": "half?", "answer": 0.5, "metadata": {"level": 3}, "id": "q-half"},
        {"prompt": "code", "answer": None, "metadata": {"tests": [{"input": "", "output": "x"}]}},
    ])
    _write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "2 + 2 =", "answer": "4", "id": 9}])
    cfg = DataConfig(source="jsonl", path=str(tmp_path / "{split}.jsonl"), num_train_prompts=10,
                     num_eval_prompts=10)
    train = load_prompts(cfg, "train")
    assert [p.prompt_id for p in train] == ["train/train/0", "q-half", "train/train/2"]
    assert [p.text for p in train] == ["1 + 1 =", "half?", "code"]
    assert [p.answer for p in train] == ["2", 0.5, None]
    assert train[1].metadata == {"level": 3} and train[0].metadata == {}
    held_out = load_prompts(cfg, "eval")
    assert [(p.prompt_id, p.answer) for p in held_out] == [("9", "4")]
    # a directory holds <split>.jsonl; num_*_prompts takes the first records
    cfg_dir = DataConfig(source="jsonl", path=str(tmp_path), num_train_prompts=2, num_eval_prompts=1)
    assert [p.text for p in load_prompts(cfg_dir, "train")] == ["1 + 1 =", "half?"]


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "x", "answer": ', "invalid JSON"),
    ({"prompt": "x"}, "missing required key 'answer'"),
    ({"prompt": 3, "answer": "3"}, "'prompt' must be a string"),
    ({"prompt": "x", "answer": "1", "metadata": [1]}, "'metadata' must be a mapping"),
    ({"prompt": "x", "answer": "1", "id": "a"}, "duplicate id 'a'"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"prompt": "ok", "answer": "1", "id": "a"}, "", bad])
    cfg = DataConfig(source="jsonl", path=str(path), num_train_prompts=10)
    with pytest.raises(DataError, match=re.escape(f"{path}:3") + ".*" + re.escape(message)):
        load_prompts(cfg, "train")
    assert issubclass(DataError, ValueError)


def test_missing_file(tmp_path):
    cfg = DataConfig(source="jsonl", path=str(tmp_path / "{split}.jsonl"))
    with pytest.raises(DataError, match="eval file .*eval.jsonl does not exist"):
        load_prompts(cfg, "eval")


# --- Parquet -------------------------------------------------------------------------------------------

def test_parquet_happy_path_and_bad_row(tmp_path):
    path = tmp_path / "math.parquet"
    pq.write_table(pa.table({
        "prompt": ["What is 1/2?", "What is 2+2?"],
        "answer": ["0.5", "4"],
        "metadata": [json.dumps({"level": 1}), None],  # JSON text (or a struct) or null
    }), path)
    cfg = DataConfig(source="parquet", path=str(path), num_train_prompts=5, num_eval_prompts=5)
    train = load_prompts(cfg, "train")
    assert [(p.prompt_id, p.text, p.answer, p.metadata) for p in train] == [
        ("math/train/0", "What is 1/2?", "0.5", {"level": 1}), ("math/train/1", "What is 2+2?", "4", {})]

    struct = tmp_path / "struct.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "answer": [1], "metadata": [{"k": "v"}], "id": ["s1"]}), struct)
    [p] = load_prompts(DataConfig(source="parquet", path=str(struct)), "train")
    assert (p.prompt_id, p.answer, p.metadata) == ("s1", 1, {"k": "v"})

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", None], "answer": ["1", "2", "3"]}), bad)
    with pytest.raises(DataError, match=re.escape(f"{bad} row 2") + ".*'prompt' must be a string"):
        load_prompts(DataConfig(source="parquet", path=str(bad)), "train")

    no_answer = tmp_path / "no_answer.parquet"
    pq.write_table(pa.table({"prompt": ["a"]}), no_answer)
    with pytest.raises(DataError, match="missing required column.*'answer'"):
        load_prompts(DataConfig(source="parquet", path=str(no_answer)), "train")


# --- templates -----------------------------------------------------------------------------------------

def test_templates():
    assert apply_template(None, "1 + 2 =") == "1 + 2 =\nAnswer:"
    assert apply_template("plain", "q") == TEMPLATES["plain"].replace("{question}", "q")
    assert apply_template("chatml", "q") == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert apply_template("Q: {question} {json: 1} A:", "{x}") == "Q: {x} {json: 1} A:"
    with pytest.raises(ValueError, match=r"data\.chat_template='nope'.*allowed"):
        apply_template("nope", "q")
    with pytest.raises(ValueError, match="render_prompt"):
        apply_template("hf", "q")


# --- tokenizer -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    cfg = DataConfig(task="chain_sum", task_kwargs={"min_terms": 2, "max_terms": 3, "max_digits": 3},
                     seed=3, num_train_prompts=300, num_eval_prompts=20)
    train, held_out = load_prompts(cfg, "train"), load_prompts(cfg, "eval")
    return ([apply_template(None, p.text) + " " + p.answer for p in train],
            [apply_template(None, p.text) + " " + p.answer for p in held_out])


@pytest.fixture(scope="module")
def tiny_tok_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tok")
    train_sentencepiece_tokenizer(corpus[0], out, vocab_size=64)
    return out


def test_sentencepiece_tokenizer_round_trip(tiny_tok_dir, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tok_dir), local_files_only=True)
    assert len(tok) <= 64
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    for text in corpus[1]:  # held-out questions with answers
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # every digit is its own token, whatever the number
    tokens = tok.convert_ids_to_tokens(tok.encode("State 90817 - 6453 = 84364", add_special_tokens=False))
    assert all(sum(c.isdigit() for c in t) <= 1 for t in tokens)
    assert "".join(t for t in tokens if any(c.isdigit() for c in t)) == "90817645384364"
    # helpers: no BOS by default for this tokenizer; EOS is the stop token
    tok2 = load_tokenizer(tiny_tok_dir)
    assert encode_prompt(tok2, "1 + 2 =") == tok2.encode("1 + 2 =", add_special_tokens=False)
    assert stop_token_ids(tok2) == (tok2.eos_token_id,)


def test_sentencepiece_tokenizer_with_bos(tmp_path, corpus):
    tok = train_sentencepiece_tokenizer(corpus[0][:100], tmp_path, vocab_size=48, add_bos=True,
                                        extra_symbols=["<answer>"])
    ids = encode_prompt(tok, "12 =")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    in_text = encode_prompt(tok, "<s>12 =")  # a BOS the template already wrote is not doubled
    assert in_text[0] == tok.bos_token_id and in_text.count(tok.bos_token_id) == 1
    assert tok.convert_ids_to_tokens(tok.encode("<answer>", add_special_tokens=False)) == ["<answer>"]


def test_render_prompt_and_load_with_tokenizer(tiny_tok_dir, tmp_path):
    tok = load_tokenizer(tiny_tok_dir)
    assert tok.chat_template is None
    assert render_prompt(tok, None, "1 + 2 =") == "1 + 2 =\nAnswer:"  # no chat template -> plain
    with pytest.raises(ValueError, match=r"data\.chat_template='hf'"):
        render_prompt(tok, "hf", "q")
    tok.chat_template = ("{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
                         "{% if add_generation_prompt %}<a>{% endif %}")
    assert render_prompt(tok, "hf", "1 + 2 =") == "<u>1 + 2 =</u><a>"
    assert render_prompt(tok, None, "1 + 2 =") == "<u>1 + 2 =</u><a>"
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert render_prompt(tok, str(jinja), "q") == "[q]"
    assert render_prompt(tok, "plain", "q") == "q\nAnswer:"

    cfg = _rg(num_train_prompts=4, chat_template="plain")
    prompts = load_prompts(cfg, "train", tokenizer=load_tokenizer(tiny_tok_dir))
    for p in prompts:
        assert p.token_ids and tok.decode(p.token_ids) == p.text + "\nAnswer:"


def test_dynamic_sampling_needs_a_step_of_real_training_prompts_before_anything_starts(tiny_tok_dir, tmp_path):
    """data.num_train_prompts is an upper bound: a 3-prompt file leaves a 4-group step nothing to refill from,
    which the start-up data check (before any rank or engine) says in one line."""
    from megatron_oapl.config import ConfigError, load_config
    from megatron_oapl.data.checks import check_run_data

    _write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{i} + 1 =", "answer": str(i + 1)} for i in range(3)])
    _write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "9 + 1 =", "answer": "10"}])
    overrides = [f"model.hf_path={tiny_tok_dir}", "data.source=jsonl", f"data.path={tmp_path}/{{split}}.jsonl",
                 "data.num_train_prompts=1000", "fleet.prompts_per_step=4", "parallel.tensor_model_parallel_size=1"]
    assert check_run_data(load_config(None, overrides, check_hardware=False)).startswith("data: 3 train")
    with pytest.raises(ConfigError, match=r"^fleet\.prompts_per_step=4 is larger than the 3 training prompts"):
        check_run_data(load_config(None, [*overrides, "fleet.dynamic_sampling=true"], check_hardware=False))
