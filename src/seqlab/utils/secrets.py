"""Keep credentials out of what a run writes (configs, overrides, the command line, logged
hyperparameters, summary.json and Hydra's own ``.hydra`` copies).

Three rules: a config key that names a credential (``api_key``, ``access_key``, ``token``,
``secret``, ``password``, ``credentials``, with any prefix: ``wandb_api_key``, ``hf_token``)
has its value replaced by ``***``; the value of any environment variable that holds one
(``*_KEY``, ``*_TOKEN``, ``*_SECRET``, ``*_PASSWORD``, e.g. ``WANDB_API_KEY``) is replaced
wherever it appears in text; and so is the password of a URL (``postgresql://user:***@host/db``,
an Optuna storage). Special-token names of tokenizers (``unk_token``...) are not credentials.
Log records pass through ``RedactFilter`` (the console and log files of configs/hydra), so
Hydra's own lines that repeat a sweep's overrides do not show them either.

Credentials can live in a git-ignored ``.env`` file at the project root (``WANDB_API_KEY=...``),
read when ``seqlab`` is imported (before Hydra composes a config); variables already set in the
environment win.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from seqlab.utils.files import write_text_atomic

REDACTED = "***"
#: a config key (last component) that holds a credential
_SECRET_KEY = re.compile(
    r"^(?:.*[_-])?(?:api[_-]?key|access[_-]?key|secret(?:[_-]?key)?|token|password|passwd|credentials?)$",
    re.IGNORECASE,
)
_SPECIAL_TOKENS = re.compile(r"^(?:unk|pad|bos|eos|cls|sep|mask|start|end)[_-]token$", re.IGNORECASE)
#: an environment variable that holds a credential
_SECRET_ENV = re.compile(r"(?:_KEY|_TOKEN|_SECRET|_PASSWORD|_PASSWD)$|API_KEY", re.IGNORECASE)
#: ``key=value`` (a Hydra override, a command-line argument) whose key names a credential; the
#: value ends at a quote (a list's repr, a quoted value) but takes brackets: a password may hold them
_ASSIGNMENT = re.compile(r"(?P<key>[\w.+~/-]+)=(?P<quote>['\"]?)(?P<value>[^\s,'\"]+)")
#: ``key: value`` (YAML, JSON: an untracked config copied into git.diff) whose key names a credential
_MAPPING = re.compile(
    r"(?P<head>(?P<q>[\"']?)(?P<key>[\w.-]+)(?P=q)\s*:\s*(?P<quote>[\"']?))(?P<value>[^\s,'\"#}]+)"
)
#: the password of a URL's user information: ``scheme://user:password@host``
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^\s:/@'\"]*:)(?P<password>[^\s/@'\"]+)(?=@)")


def is_secret_key(name: Any) -> bool:
    text = str(name).rsplit(".", 1)[-1].lstrip("+~")
    return bool(_SECRET_KEY.match(text)) and not _SPECIAL_TOKENS.match(text)


def secret_env_values(min_length: int = 8) -> list[str]:
    """Values of the credential-holding environment variables (short values are skipped: they
    would match ordinary text)."""
    values = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= min_length}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, env_values: list[str] | None = None) -> str:
    for value in secret_env_values() if env_values is None else env_values:
        text = text.replace(value, REDACTED)

    def assignment(match: re.Match[str]) -> str:
        return f"{match['key']}={match['quote']}{REDACTED}" if is_secret_key(match["key"]) else match[0]

    def mapping(match: re.Match[str]) -> str:
        return f"{match['head']}{REDACTED}" if is_secret_key(match["key"]) else match[0]

    text = _URL_PASSWORD.sub(lambda match: match["head"] + REDACTED, text)
    return _MAPPING.sub(mapping, _ASSIGNMENT.sub(assignment, text))


class RedactFilter(logging.Filter):
    """A log handler's filter (configs/hydra/job_logging, hydra_logging): the record's message,
    arguments filled in, with credentials redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: the handler reports it as logging does
            return True
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def redact(value: Any, env_values: list[str] | None = None) -> Any:
    """A copy of ``value`` (plain dicts, lists, strings) with credentials replaced."""
    if env_values is None:  # read the environment once per call, not once per string
        env_values = secret_env_values()
    if isinstance(value, dict):
        return {
            key: REDACTED if is_secret_key(key) and item not in (None, "") else redact(item, env_values)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item, env_values) for item in value)
    if isinstance(value, str):
        return redact_text(value, env_values)
    return value


def scrub_hydra_files(run_dir: Path, subdir: str = ".hydra") -> None:
    """Redact the config copies Hydra wrote into ``<run>/.hydra`` before the job started."""
    for path in sorted((run_dir / subdir).glob("*.yaml")):
        scrub_yaml(path)


def scrub_yaml(path: Path) -> None:
    """Redact a YAML file in place (unresolved: interpolations stay as they were written)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        return
    original = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    cleaned = redact(original)
    if cleaned != original:
        write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(cleaned)))


def load_env_file(path: Path) -> list[str]:
    """Set the variables of a ``.env`` file that the environment does not already define;
    returns their names (never the values)."""
    if not path.is_file():
        return []
    from dotenv import dotenv_values

    added = []
    for key, value in dotenv_values(path).items():
        if value is not None and key not in os.environ:
            os.environ[key] = value
            added.append(key)
    return added
