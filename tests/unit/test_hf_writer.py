"""The one HF directory writer (`weights/hf_io.py`), as plain file I/O (no ranks): shards within the size
limit and one merged index, and the one list of side files that `oapl train`'s export and `oapl convert`
both copy."""

from __future__ import annotations

import json

import torch

from megatron_oapl.data.tokenizer import TOKENIZER_FILES
from megatron_oapl.weights.hf_io import copy_side_files, hf_tensor_reader, merge_stage_indexes, write_stage_shards


def test_large_exports_are_sharded_with_an_index(tmp_path):
    """The > 2 GiB path, with a tiny shard limit; weights cast to the asked dtype; a stale single file of an
    earlier export removed (a loader would prefer it to the index)."""
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(8, 16) for i in range(5)}
    (tmp_path / "model.safetensors").write_bytes(b"stale single file of an earlier export")
    write_stage_shards(iter(tensors.items()), tmp_path, 0, shard_bytes=600, dtype=torch.bfloat16)
    index = merge_stage_indexes(tmp_path, 1)
    files = [f"model-s000-0000{i}.safetensors" for i in (1, 2, 3)]  # 256 bytes each: two per 600-byte shard
    assert sorted(set(index["weight_map"].values())) == files
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == files
    assert not list(tmp_path.glob("index.stage-*"))  # the partial index is merged and gone
    on_disk = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert on_disk == index and index["metadata"]["total_size"] == 5 * 8 * 16 * 2
    assert set(index["weight_map"]) == set(tensors)
    read = hf_tensor_reader(tmp_path)
    for name, tensor in tensors.items():
        assert read(name).dtype == torch.bfloat16 and torch.equal(read(name), tensor.to(torch.bfloat16))


def test_train_export_and_convert_copy_the_same_tokenizer_files(tmp_path):
    """Both copy every tokenizer file of the source model (once three lists: the export's lacked
    added_tokens.json and chat_template.json); convert writes config.json anew instead of copying it."""
    import transformers

    from megatron_oapl.checkpoint.convert import write_hf_side_files

    source = tmp_path / "source"
    source.mkdir()
    for name in (*TOKENIZER_FILES, "config.json", "generation_config.json", "sentencepiece.model"):
        (source / name).write_text(f"the source's {name}")
    export, convert = tmp_path / "export", tmp_path / "convert"
    export.mkdir()
    convert.mkdir()
    copy_side_files(source, export)  # what `oapl train`'s final export copies
    config = transformers.LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2)
    write_hf_side_files(convert, config, source)

    def copied(directory):
        return {p.name for p in directory.iterdir() if p.read_text() == f"the source's {p.name}"}

    assert copied(export) == {*TOKENIZER_FILES, "config.json", "generation_config.json"}
    assert copied(convert) == {*TOKENIZER_FILES, "generation_config.json"}
    assert json.loads((convert / "config.json").read_text())["vocab_size"] == 37
