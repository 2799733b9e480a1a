"""Secrets out of what mmpipe writes: MLflow params, log files, the flow run's logs, error messages.

`redact(text)` masks a URI's password (`http://user:***@host`) or bare token (`https://***@host`),
the values of secret-looking query parameters (`?token=***`, `X-Amz-Signature=***`), and the value
of any secret-looking environment variable (MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY,
PREFECT_API_AUTH_STRING, ...) wherever it appears. `CREDENTIAL_FREE` is the pattern flow parameters
must match: a secret typed into the Prefect UI would be stored with the flow run, so it is refused.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@\s:'\"]+)(?P<password>:[^/@\s'\"]*)?@")
_QUERY = re.compile(r"(?P<key>[?&](?:[^=&\s#]*[_.-])?(?:token|secret|passw(?:or)?d|pwd|signature|sig|credential|"
                    r"api[_-]?key|access[_-]?key|auth)(?:[_.-][^=&\s#]*)?=)[^&\s#'\"]+", re.IGNORECASE)
_SECRET_ENV = re.compile(r"^(?!.*_(?:PATH|FILE|DIR|MODE|SOCK)$).*(?:TOKEN|SECRET|PASSWORD|PASSWD|AUTH_STRING|API_KEY)")
CREDENTIAL_FREE = r"^(?![\s\S]*://[^/@\s]*@)[\s\S]*$"
"""No `scheme://user:password@` (or `scheme://token@`) anywhere in the value."""


def _userinfo(match: re.Match) -> str:
    user = f"{match.group('user')}:{MASK}" if match.group("password") is not None else MASK
    return f"{match.group('scheme')}{user}@"


def _env_secrets() -> list[str]:
    return sorted((value for key, value in os.environ.items() if _SECRET_ENV.search(key) and len(value) >= 8),
                  key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every secret masked (see the module doc); text without one comes back unchanged."""
    text = _USERINFO.sub(_userinfo, text)
    text = _QUERY.sub(lambda m: m.group("key") + MASK, text)
    for secret in _env_secrets():
        text = text.replace(secret, MASK)
    return text


class RedactingFormatter(logging.Formatter):
    """A log formatter whose lines (message, arguments and traceback) pass through `redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
