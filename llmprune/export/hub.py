"""Push a pruned model folder to the Hugging Face Hub in one commit, with its model card; or, as a dry run,
write exactly the files that would be uploaded into a local folder. The token is never logged or written."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import LLMPruneError
from ..record import JobRecord
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


def _staging_parent(src: Path) -> tuple[Path | None, bool]:
    """Where to stage an upload of `src`: the system temporary folder when it lies on the same file system (hard
    links, no copy), else beside `src` (outside it) when writable, else the temporary folder with copies."""
    tmp = Path(tempfile.gettempdir())
    try:
        if os.stat(tmp).st_dev == os.stat(src).st_dev:
            return tmp, True
    except OSError:
        pass
    if os.access(src.parent, os.W_OK):
        return src.parent, True
    return tmp, False


def _stage(src: Path, dst: Path, record: JobRecord | None, card: bool, repo_id: str, *, link: bool,
           base_model: str | None, license: str | None) -> list[str]:
    """Put into `dst` exactly the files that go up: those of `src` (hard-linked with `link`, else copied), the
    model card written there, and llmprune's own files with any local path made portable. `src` is only read;
    every file changed in `dst` is replaced by a new one (a hard link is never written through)."""
    from .card import _model_kind
    from .provenance import OWN_FILES, PathScrubber, scrub_folder

    for rel in upload_files(src):
        if card and rel == "README.md":
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(src / rel, dst / rel)
                continue
            except OSError:
                pass
        shutil.copy2(src / rel, dst / rel)
    scrubber = PathScrubber({src: src.resolve().name})
    if card:
        kind = _model_kind(record)  # judged before paths go
        rec = JobRecord.from_dict(scrubber.scrub({**record.to_dict(), "model_kind": kind}))
        write_card(dst, rec, repo_id, base_model=base_model, license=license)
    # llmprune's own files (and transformers' configs, values only); a README.md of the user's own stays as it is
    scrub_folder(dst, scrubber, only=OWN_FILES | ({"README.md"} if card else set()))
    return upload_files(dst)


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                dry_run_dir: str | os.PathLike | None = None, token: str | None = None, api=None,
                base_model: str | None = None, license: str | None = None) -> dict[str, Any]:
    """Upload a pruned model folder to the Hub repo `repo_id` in ONE commit: the repo is created if needed
    (`private` applies only then), the branch `revision` too, and the folder goes up with `upload_folder`.

    The upload is staged in a temporary folder (hard links where possible) and the source folder is never
    modified, whether the upload succeeds or fails. A folder saved by llmprune (with llmprune.json) gets its model
    card written as README.md there, unless it holds a README.md of its own (one llmprune wrote is regenerated, so
    it names `repo_id`); `base_model` and `license` go into that card's metadata. A folder without llmprune.json is
    uploaded with a warning: it gets no card of llmprune's. llmprune's own files (llmprune.json, results.json,
    *.md) go up with local absolute paths made portable (see `provenance`). The token comes from `token`, $HF_TOKEN
    or the saved login, and is never logged or written. `dry_run_dir`: write exactly the staged files into that new
    or empty folder (copies), and upload nothing; no token needed. `api`: an `HfApi`-like object (tests).
    Returns {repo_id, revision, files, url, card} or {..., dry_run: path}; `card` is "llmprune", "own" (the
    folder's README.md) or None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    src = Path(folder).expanduser()
    if not src.is_dir():
        raise LLMPruneError(f"model folder not found: {src}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise LLMPruneError(f"invalid repo id {repo_id!r}: {str(e).splitlines()[0]}") from None
    record = read_record(src) if (src / "llmprune.json").is_file() else None
    card = _needs_card(src)
    card_kind = "llmprune" if card else ("own" if (src / "README.md").is_file() else None)
    if record is None:
        log.warning("%s has no llmprune.json (not saved by llmprune?): %s", src,
                    "its own README.md is uploaded as the model card" if card_kind else
                    "it is uploaded without a model card")
    elif not card and (base_model or license):
        log.warning("%s has a README.md of its own: it is uploaded as is, without --base-model/--license", src)
    stage = {"record": record, "card": card, "repo_id": repo_id, "base_model": base_model, "license": license}

    if dry_run_dir is not None:
        dst = Path(dry_run_dir).expanduser()
        if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
            raise LLMPruneError(f"the dry-run folder {dst} must lie outside the model folder {src}")
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise LLMPruneError(f"dry-run folder {dst} is not empty: give a new or empty folder")
        from ..outputs import write_output_dir

        def write(folder: Path) -> None:  # a temporary sibling, put in place whole (llmprune.outputs)
            _stage(src, folder, link=False, **stage)

        write_output_dir(dst, write, need=sum((src / rel).stat().st_size for rel in upload_files(src)),
                         what="the dry run")
        files = upload_files(dst)
        log.info("dry run: %d files for %s written to %s; nothing uploaded", len(files), repo_id, dst)
        return {"repo_id": repo_id, "revision": revision, "private": private, "files": files, "dry_run": str(dst),
                "token_found": bool(_resolve_token(token)), "card": card_kind}

    secret = _resolve_token(token)
    if not secret:
        raise LLMPruneError(NO_TOKEN)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    from huggingface_hub.errors import HfHubHTTPError

    message = "Upload pruned model with llmprune"
    if record is not None:
        cfg = record.config
        what = [f"{p['method']} {p.get('pattern', 'unstructured')}" for p in [cfg.prune] if p]
        what += [b["method"] for b in [cfg.blocks] if b]
        message = f"Upload pruned model ({', '.join(what)}) with llmprune" if what else message
    parent, link = _staging_parent(src)
    with tempfile.TemporaryDirectory(prefix=".llmprune-push-", dir=parent) as tmp:
        staged = Path(tmp) / (src.resolve().name or "model")
        staged.mkdir()
        files = _stage(src, staged, link=link, **stage)
        log.info("pushing %d files from %s to %s%s", len(files), src, repo_id,
                 f" (revision {revision})" if revision else "")
        try:
            repo_url = api.create_repo(repo_id, token=secret, private=private, repo_type="model", exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, token=secret, repo_type="model", exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(staged), repo_type="model", revision=revision,
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
            "repo_url": str(repo_url) if repo_url else None, "card": card_kind}


__all__ = ["push_folder", "upload_files", "NO_TOKEN"]
