"""What a URI may look like once it leaves memory: no credentials, no signatures, printable.

A URI may carry what opens it (`user:password@`, a presigned URL's `X-Amz-Signature=…`, a `?token=`),
which serves the fetch only. `redact` removes that from a URI, or from any text quoting one, and every URI
passes through it before it is stored, printed or reported. `public` also makes a name storable: bytes
that are not UTF-8 and control characters become `\\xNN`. Fingerprints are taken of redacted configs.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

_SCHEME = r"(?i)\b([a-z][a-z0-9+.\-]*://)"
# user:password@host — the userinfo of RFC 3986 (no '/', '?', '#' or '@' inside).
_USERINFO = re.compile(_SCHEME + r"[^/?#@\s]*@")
# KEY:SECRET@bucket where the secret holds '/' or '+' (AWS secret keys do): a ':' not followed by a port.
_USERINFO_SLASHED = re.compile(_SCHEME + r"[^/?#@\s:]+:(?!\d*(?:[/?#\s]|$))[^@\s]*?@")
# Query parameters that authenticate (AWS/GCS/Azure presigning, CloudFront, tokens, API keys) or only vary
# with each signing (expiry, date): removed with their value.
_SECRET_PARAM = re.compile(
    r"(?i)([?&])(?:x-amz-[\w-]*|x-goog-[\w-]*|signature|sig|expires|policy|key-pair-id|awsaccesskeyid"
    r"|token|access_token|id_token|refresh_token|auth|authorization|api_key|apikey|api-key|key|password"
    r"|passwd|secret|client_secret|credential|credentials)=[^&#\s'\")\]>]*&?")
_DANGLING = re.compile(r"[?&](?=[#\s'\")\]>]|$)")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def redact(text: str) -> str:
    """`text` with every URL's credentials and signature parameters removed (idempotent; text without
    them is returned unchanged)."""
    out = _USERINFO_SLASHED.sub(r"\1", text)
    while True:  # a password with an unescaped '@' (user:p@ss@host) leaves a second userinfo
        out, n = _USERINFO.subn(r"\1", out)
        if not n:
            break
    while True:  # adjacent parameters share their '&': one pass removes every other one
        out, n = _SECRET_PARAM.subn(r"\1", out)
        if not n:
            break
    return _DANGLING.sub("", out) if out != text else out


def public(text: str) -> str:
    """The form of a URI (or of a message quoting one) that is stored and shown: `redact`ed, and each byte
    of a file name that is not UTF-8 (Python's surrogate escapes) or a control character written as
    `\\xNN` (Parquet and JSON need UTF-8; one entry, one line)."""
    out = redact(text)
    if not _UNPRINTABLE.search(out):
        return out
    return "".join(_escape(c) if _UNPRINTABLE.match(c) else c for c in out)


def _escape(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's surrogateescape of byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def redact_tree(obj: Any) -> Any:
    """A copy of a JSON-like tree (a config dump) with every string `redact`ed."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_tree(v) for v in obj]
    return obj


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(url without its userinfo, user, password), percent-decoded; (url, None, None) if it has none."""
    for pattern in (_USERINFO_SLASHED, _USERINFO):
        m = pattern.match(url)
        if m:
            info = url[len(m.group(1)):m.end() - 1]
            user, sep, password = info.partition(":")
            return m.group(1) + url[m.end():], unquote(user), unquote(password) if sep else None
    return url, None, None
