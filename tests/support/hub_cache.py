"""A Hugging Face hub cache laid out as `hf download` leaves it (blobs, a snapshot of symlinks, refs/main),
checked by huggingface_hub's own scanner, so code that resolves hub ids offline meets the real layout."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(cache: Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> Path:
    """What `hf download [--repo-type dataset] repo_id` leaves in `cache`; returns the snapshot directory."""
    import huggingface_hub
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    scanned = {r.repo_id: r for r in huggingface_hub.scan_cache_dir(cache).repos}
    assert {rev.commit_hash for rev in scanned[repo_id].revisions} == {COMMIT}, "not huggingface_hub's layout"
    return snapshot
