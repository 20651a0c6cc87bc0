"""What a secret is, and keeping it out of everything sftlab writes (one definition).

API keys and tokens belong in the environment (``WANDB_API_KEY``, ``HF_TOKEN``) or in
``~/.netrc``. If one is given on the command line anyway, or interpolated into the config, it
must not reach a run dir, an exported model or a logger: keys that name a credential are
dropped from every saved config (:func:`scrub_secrets`), and the *values* of such keys and of
such environment variables are masked wherever else they appear (:func:`public_config`,
:func:`mask_files` for Hydra's ``.hydra/*.yaml`` copies of the command line).

A name is a secret's when it matches :data:`SECRET_NAME`: api key, secret, password,
credential, private key anywhere in it, or ``token`` as its last word (``hf_token``,
``HF_TOKEN``, ``wandb.token``), so that ``pad_token_from_eos``, ``max_tokens`` or
``TOKENIZERS_PARALLELISM`` stay. The same rule serves config keys and environment variables.
Nothing heavy is imported here: the deploy code and the run code both use it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sftlab.files import atomic_write_text

SECRET_NAME = re.compile(
    r"api[_-]?key|secret|passw(or)?d|credential|private[_-]?key|(^|[_\-.])token$",
    re.IGNORECASE,
)
MASK = "***"
# shorter values ("", "0", "null") would mask half of every file; environment values shorter
# than this are not credentials (WANDB_API_KEY is 40 characters, HF_TOKEN 37)
_MIN_CONFIG_VALUE, _MIN_ENV_VALUE = 4, 8


def is_secret_name(name: object) -> bool:
    return bool(SECRET_NAME.search(str(name)))


def scrub_secrets(value: Any) -> Any:
    """A copy of a nested dict/list without any key that names a credential."""
    if isinstance(value, Mapping):
        return {k: scrub_secrets(v) for k, v in value.items() if not is_secret_name(k)}
    if isinstance(value, list | tuple):
        return [scrub_secrets(v) for v in value]
    return value


def secret_values(config: Any, environ: Mapping[str, str] | None = None) -> set[str]:
    """Values to mask: those of config keys that name a credential and of such env variables."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                if is_secret_name(k) and isinstance(v, str | int) and not isinstance(v, bool):
                    found.add(str(v))
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)

    walk(config)
    env = os.environ if environ is None else environ
    found |= {v for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_ENV_VALUE}
    return {v for v in found if len(v) >= _MIN_CONFIG_VALUE}


def mask(text: str, values: set[str]) -> str:
    for v in sorted(values, key=len, reverse=True):
        text = text.replace(v, MASK)
    return text


def public_config(config: dict[str, Any], values: set[str]) -> dict[str, Any]:
    """``config`` without credential keys, and with secret values masked in every string."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str):
            return mask(value, values)
        return value

    return walk(scrub_secrets(config))


def mask_files(paths: list[Path], values: set[str]) -> None:
    """Mask secret values in files already written (Hydra's ``.hydra/*.yaml``)."""
    if not values:
        return
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        masked = mask(text, values)
        if masked != text:
            atomic_write_text(path, masked)
