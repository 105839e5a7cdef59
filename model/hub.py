"""The Hugging Face Hub: a repo id resolved to a folder in the local cache (downloading only when allowed),
and a model folder uploaded. The token comes from HF_TOKEN or the Hub's own login and is never logged."""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import tokenizer
from .card import CARD_NAME
from .layout import CONFIG_NAME, LOSS_CURVE_NAME, WEIGHTS_NAME, CheckpointError

# What a model repo on the Hub holds: never optimizer state (train_state.pt) or other files.
UPLOAD_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, *tokenizer.TOKENIZER_FILES, LOSS_CURVE_NAME)
DOWNLOAD_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.pt", "*.md", "*.png"]


def download(repo: str) -> Path:
    """A Hub repo (`org/name` or `org/name@revision`) in the local cache, downloading if allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, revision = repo.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=DOWNLOAD_PATTERNS))
    except LocalEntryNotFoundError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise CheckpointError(
            f"could not load {repo!r}: it is not a local path, {why}, and the repo is not in the local Hub "
            "cache; connect to the internet once, or pass a local folder or .safetensors file"
        ) from err
    except RepositoryNotFoundError as err:
        raise CheckpointError(
            f"could not load {repo!r}: no such Hub repo (or it is private: set HF_TOKEN or run `hf auth login`)"
        ) from err
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise CheckpointError(f"could not load {repo!r} from the Hub: {err}") from err


def is_repo_id(text: str) -> bool:
    """Whether text reads as a Hub repo id, `org/name` or `org/name@revision` (not a checkpoint file name)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", text)) and not text.endswith((".pt", ".safetensors"))


def resolve(source: str | Path) -> Path:
    """A local checkpoint file or folder for source; Hub repo ids are downloaded or read from cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not is_repo_id(str(source)):
        raise CheckpointError(f"checkpoint {str(source)!r} not found: no such file or folder, and not a Hub repo id")
    return download(str(source))


def upload_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the Hub repo if needed and upload the folder's weights, config, tokenizer files, model card
    and loss curve (UPLOAD_FILES, nothing else); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        allow_patterns=list(UPLOAD_FILES),
        commit_message="Upload ShakespeareGPT",
    )
    return str(getattr(info, "commit_url", info))
