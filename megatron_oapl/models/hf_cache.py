"""`model.hf_path` as a local directory or a Hugging Face hub id found in the local cache.

Nothing is downloaded: learners, engines and converters on a cluster start many processes at once,
often on machines without internet, so a hub id must already be in the cache (`hf download ID` on a
machine with internet, then share the cache through HF_HOME / HF_HUB_CACHE).
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_oapl.config import ConfigError


def _looks_like_hub_id(text: str) -> bool:
    """`name` or `org/name` in the hub's own syntax (not `./x`, `/x`, `~/x` or `a/b/c`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_hf_path(path: str, cache_dir: str | Path | None = None) -> str:
    """`path` itself when it is a directory; else the cached snapshot directory of hub id `path` (in
    `cache_dir`, default: huggingface_hub's, from HF_HUB_CACHE / HF_HOME). A ConfigError saying how to
    download it otherwise."""
    local = os.path.expanduser(path)
    if Path(local).is_dir():
        return local
    if Path(local).exists():
        raise ConfigError(f"model.hf_path={path!r} is a file (expected an HF model directory or hub id)")
    if not _looks_like_hub_id(path):
        raise ConfigError(f"model.hf_path={path!r} is not a directory (expected an HF model directory or a hub "
                          "id such as Qwen/Qwen3-4B)")
    from huggingface_hub import constants, errors, snapshot_download

    # Recent huggingface_hub versions tell a partial download apart; older ones return the folder.
    incomplete = getattr(errors, "IncompleteSnapshotError", errors.LocalEntryNotFoundError)
    cache = str(cache_dir or constants.HF_HUB_CACHE)
    try:
        return snapshot_download(path, cache_dir=cache, local_files_only=True)
    except incomplete:
        problem = "is only partly in"
    except errors.LocalEntryNotFoundError:
        problem = "is neither a local directory nor in"
    raise ConfigError(f"model.hf_path={path!r} {problem} the Hugging Face cache {cache} (nothing is downloaded "
                      f"here): run `hf download {path}` (older huggingface_hub: `huggingface-cli download "
                      f"{path}`) on a machine with internet, then set HF_HOME (or HF_HUB_CACHE) to that cache "
                      "here, or give a local directory")

