"""`model.hf_path` as a hub id, resolved through the local Hugging Face cache and never downloaded
(`models.hf_cache`). The cache is laid out the way huggingface_hub writes it (blobs, a snapshot of
symlinks, refs/main), and huggingface_hub's own scanner must accept it before it is used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_oapl.config import ConfigError
from megatron_oapl.models.hf_cache import resolve_hf_path
from tests.support.hub_cache import COMMIT, populate_cache

REPO = "tiny-org/tiny-llama3"
CONFIG = {"model_type": "llama", "vocab_size": 37, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}}


@pytest.fixture
def cache(tmp_path):
    root = tmp_path / "hub"
    populate_cache(root, REPO, {"config.json": json.dumps(CONFIG).encode()})
    return root


def test_a_cached_hub_id_resolves_to_its_snapshot(cache):
    assert Path(resolve_hf_path(REPO, cache_dir=cache)) == cache / f"models--tiny-org--tiny-llama3/snapshots/{COMMIT}"


def test_a_local_directory_is_kept_as_given(tmp_path):
    assert resolve_hf_path(str(tmp_path)) == str(tmp_path)


def test_a_missing_hub_id_says_how_to_download_it(cache):
    with pytest.raises(ConfigError) as err:
        resolve_hf_path("tiny-org/absent", cache_dir=cache)
    message = str(err.value)
    assert "\n" not in message and "model.hf_path='tiny-org/absent'" in message
    assert "`hf download tiny-org/absent`" in message and str(cache) in message and "HF_HOME" in message


@pytest.mark.parametrize("path, says", [("./absent-model", "is not a directory"), ("a/b/c", "is not a directory")])
def test_paths_that_are_not_hub_ids_are_not_looked_up(path, says):
    with pytest.raises(ConfigError, match=says):
        resolve_hf_path(path)


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a file"):
        resolve_hf_path(str(tmp_path / "model.json"))


def test_run_config_reads_a_hub_id_from_the_cache_named_by_HF_HUB_CACHE(cache):
    """In a fresh process (huggingface_hub reads HF_HUB_CACHE when imported), offline: the run config's
    model section comes from the cached config.json and hf_path becomes the snapshot every reader can open;
    a missing id names the cache of the environment."""
    script = textwrap.dedent(f"""
        import json
        from megatron_oapl.config import ConfigError, load_config
        from megatron_oapl.models.hf_config import resolve_model

        cfg = resolve_model(load_config(None, ["model.hf_path={REPO}"], check_hardware=False))
        try:
            resolve_model(load_config(None, ["model.hf_path=tiny-org/absent"], check_hardware=False))
            missing = None
        except ConfigError as err:
            missing = str(err)
        print(json.dumps({{"hf_path": cfg.model.hf_path, "rope": cfg.model.rope_scaling.type,
                          "context": cfg.model.rope_scaling.original_max_position_embeddings, "missing": missing}}))
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["hf_path"]) == cache / f"models--tiny-org--tiny-llama3/snapshots/{COMMIT}"
    assert (result["rope"], result["context"]) == ("llama3", 64)
    assert str(cache) in result["missing"] and "hf download tiny-org/absent" in result["missing"]
