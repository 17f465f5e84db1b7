"""Push a pruned model folder to the Hugging Face Hub in one commit, with its model card; or, as a dry run,
write exactly the files that would be uploaded into a local folder. The token is never logged or written."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import LLMPruneError
from .card import CARD_MARKER, read_record, write_card

log = logging.getLogger(__name__)

# Never uploaded: what huggingface_hub leaves out anyway (.git, .cache/huggingface), plus our temporary files.
EXTRA_IGNORE = [".*.tmp", ".*.tmp-*", "*/.*.tmp", "*/.*.tmp-*"]
NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login`"


def upload_files(folder: str | os.PathLike) -> list[str]:
    """The files of `folder` that `upload_folder` sends, as POSIX paths relative to it, sorted."""
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    folder = Path(folder)
    rel = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    return sorted(filter_repo_objects(rel, ignore_patterns=[*EXTRA_IGNORE, *DEFAULT_IGNORE_PATTERNS]))


def _needs_card(folder: Path) -> bool:
    """A card is written when the folder has a record and no README.md of its own (ours is regenerated)."""
    if not (folder / "llmprune.json").is_file():
        return False
    readme = folder / "README.md"
    if not readme.is_file():
        return True
    try:
        return CARD_MARKER in readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def _resolve_token(token: str | None) -> str | None:
    if token:
        return token
    env = os.environ.get("HF_TOKEN")
    if env and env.strip():
        return env.strip()
    from huggingface_hub import get_token

    return get_token()


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod in ("httpx2", "httpx"):
        try:
            errors.append(__import__(mod).TransportError)
        except (ImportError, AttributeError):
            pass
    try:
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    return tuple(errors)


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                dry_run_dir: str | os.PathLike | None = None, token: str | None = None, api=None) -> dict[str, Any]:
    """Upload a pruned model folder to the Hub repo `repo_id` in ONE commit: the repo is created if needed
    (`private` applies only then), the branch `revision` too, and the whole folder goes up with `upload_folder`.

    A folder saved by llmprune (with llmprune.json) gets its model card written as README.md first, unless it
    holds a README.md of its own (one llmprune wrote is regenerated, so it names `repo_id`). The token comes from
    `token`, $HF_TOKEN or the saved login, and is never logged or written. `dry_run_dir`: copy exactly the files
    that would be uploaded (with the card) into that new or empty folder, and upload nothing; no token needed.
    `api`: an `HfApi`-like object (tests). Returns {repo_id, revision, files, url} or {..., dry_run: path}."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    src = Path(folder).expanduser()
    if not src.is_dir():
        raise LLMPruneError(f"model folder not found: {src}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise LLMPruneError(f"invalid repo id {repo_id!r}: {str(e).splitlines()[0]}") from None
    card = _needs_card(src)

    if dry_run_dir is not None:
        dst = Path(dry_run_dir).expanduser()
        if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
            raise LLMPruneError(f"the dry-run folder {dst} must lie outside the model folder {src}")
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise LLMPruneError(f"dry-run folder {dst} is not empty: give a new or empty folder")
        from ..outputs import write_output_dir

        todo = [rel for rel in upload_files(src) if not (card and rel == "README.md")]

        def write(folder: Path) -> None:  # a temporary sibling, put in place whole (llmprune.outputs)
            for rel in todo:
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, folder / rel)
            if card:
                write_card(folder, read_record(src), repo_id)

        write_output_dir(dst, write, need=sum((src / rel).stat().st_size for rel in todo), what="the dry run")
        files = upload_files(dst)
        log.info("dry run: %d files for %s written to %s; nothing uploaded", len(files), repo_id, dst)
        return {"repo_id": repo_id, "revision": revision, "private": private, "files": files, "dry_run": str(dst),
                "token_found": bool(_resolve_token(token))}

    secret = _resolve_token(token)
    if not secret:
        raise LLMPruneError(NO_TOKEN)
    if card:
        write_card(src, read_record(src), repo_id)
    files = upload_files(src)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    from huggingface_hub.errors import HfHubHTTPError

    message = "Upload pruned model with llmprune"
    if (src / "llmprune.json").is_file():
        cfg = read_record(src).get("config") or {}
        what = [f"{p['method']} {p.get('pattern', 'unstructured')}" for p in [cfg.get("prune")] if p]
        what += [b["method"] for b in [cfg.get("blocks")] if b]
        message = f"Upload pruned model ({', '.join(what)}) with llmprune" if what else message
    log.info("pushing %d files from %s to %s%s", len(files), src, repo_id, f" (revision {revision})" if revision else "")
    try:
        repo_url = api.create_repo(repo_id, token=secret, private=private, repo_type="model", exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, token=secret, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(src), repo_type="model", revision=revision,
                                   token=secret, commit_message=message,
                                   ignore_patterns=list(EXTRA_IGNORE))
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        first = _scrub(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, secret)
        hint = {401: "the token is invalid or expired", 403: "the token may not write to this repo"}.get(status, first)
        raise LLMPruneError(f"the Hugging Face Hub refused the push of {repo_id} ({status or 'error'}: {hint}); "
                            "nothing was pushed") from None
    except _network_errors() as e:
        raise LLMPruneError(f"the Hugging Face Hub was unreachable ({type(e).__name__}); nothing was pushed to "
                            f"{repo_id}") from None
    url = getattr(commit, "commit_url", None) or str(commit or repo_url or f"https://huggingface.co/{repo_id}")
    log.info("pushed %s: %s", repo_id, url)
    return {"repo_id": repo_id, "revision": revision, "private": private, "files": files, "url": str(url),
            "repo_url": str(repo_url) if repo_url else None}


__all__ = ["push_folder", "upload_files", "NO_TOKEN"]
