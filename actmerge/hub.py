"""Publishing a baked checkpoint to the Hugging Face Hub: what gets uploaded, when we refuse, and the
upload itself. ``get_hf_api()`` is the one seam tests replace; the token is left to huggingface_hub
(HF_TOKEN or ``hf auth login``): we only check that one exists.

What is published is exactly what ``actmerge verify`` recorded: ``actmerge/verify.json`` lists every
file of the checkpoint with its sha256 and size, and a push refuses any file added, changed or
removed since, any symlink and anything that is not a regular file; the upload is that explicit
list (one commit), never a walk of the folder at upload time. ``--no-verify`` publishes without a
record, but still regular files only, never a symlink."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import errors as hf_errors

from . import __version__
from .errors import PublishError
from .io.output import PROVENANCE_DIR
from .io.provenance import (
    VERIFY_JSON,
    changed_since_verify,
    checkpoint_files,
    is_weights_file,
)

HUB_URL = "https://huggingface.co"
_NAME_MAX = 96  # the Hub's limit for "namespace/name" parts
_REPORT = f"{PROVENANCE_DIR}/{VERIFY_JSON}"


@dataclass
class PushResult:
    repo_id: str
    url: str
    files: list[str]
    dry_run: bool


def get_hf_api() -> huggingface_hub.HfApi:
    """The Hub client. Tests monkeypatch this function with a fake that records calls."""
    return huggingface_hub.HfApi(library_name="actmerge", library_version=__version__)


def upload_plan(folder: str | Path) -> list[str]:
    """The relative paths (posix, sorted) of the regular files ``push`` would upload from ``folder``
    (symlinks and special files are never among them: ``check_publishable`` refuses them)."""
    files, _ = checkpoint_files(folder)
    return files


def check_publishable(folder: str | Path, *, verify_required: bool = True, force: bool = False) -> list[str]:
    """The files to upload from ``folder`` (relative posix paths, sorted), or a PublishError: a folder
    that holds a symlink or a special file; one that is not an actmerge output (unless ``force``);
    one not verified, or with any file added, changed or removed since ``actmerge verify`` recorded
    it (unless ``verify_required`` is False, the CLI's --no-verify)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a directory: give the output directory of `actmerge bake`.")
    files, refused = checkpoint_files(folder)
    if refused:
        raise PublishError(
            f"{folder}: {refused[0]}"
            + (f" (+{len(refused) - 1} more)" if len(refused) > 1 else "")
            + ": push uploads the checkpoint's own regular files only. Replace it with the file itself "
            f"or remove it, then run `actmerge verify {folder}` again."
        )
    if not files:
        raise PublishError(f"{folder} holds no files to upload.")
    if not (folder / PROVENANCE_DIR / "bake.json").is_file() and not force:
        raise PublishError(
            f"{folder} is not an actmerge output (no {PROVENANCE_DIR}/bake.json): bake one with "
            "`actmerge bake ... -o DIR`, or pass --force to upload this directory anyway."
        )
    if not verify_required:
        return files
    report = folder / _REPORT
    if _REPORT not in files:
        raise PublishError(
            f"{folder} has not been verified: run `actmerge verify {folder}` first (it checks the "
            "checkpoint against the hooked base model), or pass --no-verify to publish it unverified."
        )
    try:
        data = json.loads(report.read_text())
        passed = data.get("passed")
    except (ValueError, AttributeError) as exc:
        raise PublishError(
            f"{report} is not a readable verification report ({exc}): run `actmerge verify {folder}` again."
        ) from exc
    if passed is not True:
        raise PublishError(
            f"{folder} failed verification ({report} says passed: {passed}): the weights do not reproduce "
            f"the steered model. Re-bake it, or run `actmerge verify {folder}` again; --no-verify publishes "
            "it anyway."
        )
    changed = changed_since_verify(folder, data)
    if changed is None:
        raise PublishError(
            f"{report} does not list the checkpoint's files (written by an earlier actmerge): run "
            f"`actmerge verify {folder}` again."
        )
    if changed:
        what = "weights" if any(is_weights_file(c.rsplit(" ", 1)[0]) for c in changed) else "files"
        shown = ", ".join(changed[:3]) + (f" (+{len(changed) - 3} more)" if len(changed) > 3 else "")
        raise PublishError(
            f"{what} changed since verification ({shown}): run `actmerge verify {folder}` again, "
            "or pass --no-verify to publish it unverified."
        )
    return files  # exactly the recorded files and the report itself


def _slug(text: str) -> str:
    """``text`` in the Hub's name alphabet: [A-Za-z0-9._-], no '--' or '..', no '-'/'.' at the ends."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    text = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", text))
    return text.strip("-.")


def default_repo_id(api, folder: str | Path) -> str:
    """``<user>/<base>-<recipe>``: the Hub user of the token, the base model's name, the recipe's name."""
    from .maps import MapSet

    folder = Path(folder)
    info_path = folder / PROVENANCE_DIR / "bake.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    base = str(info.get("base_model") or folder.resolve().name).rstrip("/\\")
    base = re.split(r"[/\\]", base)[-1].removesuffix(".gguf")
    maps_path = folder / PROVENANCE_DIR / "maps.safetensors"
    recipe = MapSet.load(maps_path).extra.get("recipe") if maps_path.is_file() else None
    name = _slug(f"{base}-{recipe or 'steered'}") or "actmerge-model"
    user = api.whoami()["name"]
    return f"{user}/{name[: _NAME_MAX - len(user) - 1].strip('-.')}"


def strength_repo_id(repo_id: str, strength: float) -> str:
    """The repo of one strength when a bake writes several (``DIR/lambda-0.5`` → ``REPO-lambda-0.5``)."""
    from .strength import label

    return f"{repo_id}-{label(strength)}"


def require_token() -> None:
    """Fail early (before a slow bake) when no Hub token is configured."""
    if huggingface_hub.get_token() is None:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens) or run `hf auth login`."
        )


def validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hf_validate

    try:
        hf_validate(repo_id)
    except HFValidationError as exc:
        raise PublishError(f"invalid repo id {repo_id!r}: {exc} Use the form 'user/name'.") from exc


def url_for(repo_id: str, revision: str | None = None) -> str:
    return f"{HUB_URL}/{repo_id}" + (f"/tree/{revision}" if revision else "")


def push(
    folder: str | Path,
    repo_id: str | None = None,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    verify_required: bool = True,
    force: bool = False,
    dry_run: bool = False,
    log=print,
) -> PushResult:
    """Upload a baked checkpoint directory to a Hub model repo (created if missing; ``revision``: a
    branch, created if missing). ``dry_run`` lists the files and touches nothing on the Hub."""
    folder = Path(folder)
    if repo_id is not None:
        validate_repo_id(repo_id)
    files = check_publishable(folder, verify_required=verify_required, force=force)
    if not dry_run:
        require_token()
    # a dry run with a full repo id needs nothing from the Hub; otherwise whoami names the namespace
    api = get_hf_api() if (repo_id is None or "/" not in repo_id or not dry_run) else None
    if repo_id is None or "/" not in repo_id:
        repo_id = _with_namespace(api, folder, repo_id, dry_run)
        if not repo_id.startswith("<user>/"):
            validate_repo_id(repo_id)
    url = url_for(repo_id, revision)
    if dry_run:
        total = sum((folder / f).stat().st_size for f in files)
        log(f"dry run: would upload {len(files)} files ({_size(total)}) to {url}")
        for f in files:
            log(f"  {f}  ({_size((folder / f).stat().st_size)})")
        return PushResult(repo_id, url, files, dry_run=True)

    message = commit_message or f"Upload {folder.name} (baked by actmerge {__version__})"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(repo_url, "repo_id", None) or repo_id
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        log(f"uploading {len(files)} files to {repo_id}" + (f" (branch {revision})" if revision else ""))
        api.create_commit(  # the explicit list, not a walk of the folder at upload time
            repo_id,
            operations=_operations(folder, files),
            commit_message=message,
            revision=revision,
            repo_type="model",
        )
    except Exception as exc:
        wrapped = _publish_error(exc, repo_id)
        if wrapped is None:
            raise
        raise wrapped from exc
    return PushResult(repo_id, url_for(repo_id, revision), files, dry_run=False)


def _operations(folder: Path, files: list[str]) -> list:
    try:
        return [
            huggingface_hub.CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files
        ]
    except ValueError as exc:  # a listed file vanished after the check
        raise PublishError(
            f"{folder} changed during the push ({exc}): run `actmerge verify {folder}` again."
        ) from None


def _with_namespace(api, folder: Path, name: str | None, dry_run: bool) -> str:
    """The default repo id, or ``name`` under the token's user; ``<user>`` in a dry run without login."""
    try:
        if name is None:
            return default_repo_id(api, folder)
        return f"{api.whoami()['name']}/{name}"
    except (OSError, hf_errors.HTTPError, KeyError, TypeError) as exc:
        if dry_run:
            return default_repo_id(_Anonymous(), folder) if name is None else f"<user>/{name}"
        raise PublishError(
            f"could not ask the Hub who you are ({exc}); pass the full repo id 'user/name', "
            "and check HF_TOKEN / `hf auth login` and the network."
        ) from exc


class _Anonymous:
    def whoami(self) -> dict:
        return {"name": "<user>"}


def _publish_error(exc: Exception, repo_id: str) -> PublishError | None:
    """huggingface_hub's HTTP and network errors as a PublishError with a remedy (None: not ours)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        msg = "HF_HUB_OFFLINE is set: unset it to publish."
    elif isinstance(exc, hf_errors.GatedRepoError):
        msg = f"{repo_id} is gated and your token has no access to it: push to a repo you own."
    elif isinstance(exc, hf_errors.RepositoryNotFoundError) or status == 404:
        msg = (
            f"{repo_id} was not found, or belongs to an account your token cannot write to: check the "
            "namespace (your user or an organisation where you have write rights)."
        )
    elif status in (401, 403):
        msg = (
            f"the Hub refused to write to {repo_id} (HTTP {status}): your token lacks write access. "
            "Create a 'write' token (or a fine-grained one with write access to this namespace) at "
            "https://huggingface.co/settings/tokens, then set HF_TOKEN or run `hf auth login`."
        )
    elif isinstance(exc, hf_errors.HfHubHTTPError):
        msg = (
            f"the Hub answered HTTP {status} for {repo_id}: {exc}. The upload is a single commit, so "
            "nothing partial was committed: retry."
        )
    elif isinstance(exc, (hf_errors.HTTPError, ConnectionError, TimeoutError)):
        msg = f"could not reach the Hub ({exc}): check the network and retry."
    else:
        return None
    return PublishError(msg)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
