"""Publishing a model folder on the Hugging Face Hub (``--push-to-hub REPO``).

:func:`check_push_access` runs before any training or merging: a push that cannot happen
(offline mode, no token, a read-only token, no network) is a one-line error up front, not
after an hour of training. :func:`push_model` uploads the finished folder, card included.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, constants, get_session, get_token
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, validate_repo_id

from forgetless.cards import CARD_FILE, set_repository
from forgetless.errors import ForgetlessError

# Any of them means the user asked for no network, whether or not huggingface_hub (which
# reads its own at import) would still refuse the upload.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# The preflight must fail fast when the Hub is unreachable, not hang on a dead network.
PREFLIGHT_TIMEOUT_S = 10.0

# (repo, token) pairs already checked in this process: the CLI may check before loading data
# and the API function again, and whoami is rate-limited.
_checked: set[tuple[str, str]] = set()


def _flag(repo_id: str) -> str:
    return f"--push-to-hub {repo_id}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _offline_setting() -> tuple[str, str] | None:
    """The variable (and its value) that puts this process in offline mode, if one does."""
    for name in OFFLINE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.upper() in ("1", "ON", "YES", "TRUE"):
            return name, value
    return ("HF_HUB_OFFLINE", "1") if constants.HF_HUB_OFFLINE else None


def _whoami(token: str) -> dict:
    # HfApi.whoami has no timeout; the shared session with one per request does.
    response = get_session().get(
        f"{constants.ENDPOINT}/api/whoami-v2",
        headers=build_hf_headers(token=token),
        timeout=PREFLIGHT_TIMEOUT_S,
    )
    hf_raise_for_status(response)
    return response.json()


def check_push_access(repo_id: str) -> None:
    """Raise a one-line :class:`ForgetlessError` unless a push to ``repo_id`` can work: not in
    offline mode, a token (``hf auth login`` or ``HF_TOKEN``), and the Hub accepting it."""
    flag = _flag(repo_id)
    try:
        validate_repo_id(repo_id)
    except ValueError as error:  # HFValidationError
        raise ForgetlessError(f"{flag}: not a repository id ({_first_line(error)})") from None
    offline = _offline_setting()
    if offline is not None:
        name, value = offline
        raise ForgetlessError(
            f"{flag}: offline mode ({name}={value}) allows no upload; unset {name} to push, "
            "or drop --push-to-hub (nothing was trained or written)"
        )
    token = get_token()
    if token is None:
        raise ForgetlessError(
            f"{flag}: no Hugging Face token; run `hf auth login` or set HF_TOKEN to a token "
            "with write access"
        )
    if (repo_id, token) in _checked:
        return
    try:
        identity = _whoami(token)
    except Exception as error:
        # Whatever failed (DNS, proxy, timeout, a rejected token), the push would fail the same
        # way after training; the library's first line says which.
        raise ForgetlessError(
            f"{flag}: the Hub did not accept the token check ({_first_line(error)}); check the "
            "network and `hf auth whoami`"
        ) from None
    role = ((identity.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise ForgetlessError(
            f"{flag}: the token of {identity.get('name', 'this user')} is read-only; log in "
            "with a write token (`hf auth login`)"
        )
    _checked.add((repo_id, token))


def push_model(folder: str | Path, repo_id: str, private: bool, commit_message: str) -> str:
    """Upload the model folder (weights, tokenizer, card) to ``repo_id``, creating the
    repository (private if asked) when it does not exist; returns its URL."""
    folder = Path(folder)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # Folders written before cards existed are pushed as they are.
        if (folder / CARD_FILE).is_file():
            set_repository(folder, url.repo_id)
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            commit_message=commit_message,
            repo_type="model",
        )
    except Exception as error:
        raise ForgetlessError(
            f"{_flag(repo_id)}: the upload failed ({_first_line(error)}); the model is saved in "
            f"{folder}: `hf upload {repo_id} {folder}` uploads it"
        ) from None
    return str(url)
