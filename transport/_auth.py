"""Authentication: HS256 JWTs (PyJWT) carried in the first frame, never in the URL.

PyJWT checks the signature, the algorithm and the times; it reads the claims with the
stdlib's lenient JSON and converts them with ``int()``, so that ``"exp": "9999999999"`` or
``"exp": true`` would pass as numbers. The claims are therefore read again, strictly
(:func:`~transport._json.loads_strict`), and each is checked for its type before PyJWT's
time checks run: a token is accepted only if every claim means exactly one thing.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import jwt

from actors._codec import MAX_LABEL_LENGTH, check_name, check_text
from actors._errors import InvalidInputError, shown

from ._json import RefusedJsonError, loads_strict
from ._protocol import ProtocolError

__all__ = [
    "CLAIMS",
    "MAX_USER_ID_LENGTH",
    "ROLES",
    "Principal",
    "mint_token",
    "secret_problem",
    "user_id_problem",
    "verify_token",
]

ALGORITHM = "HS256"
#: Every claim a token may carry; any other claim refuses the token, since a claim the server
#: does not understand (an audience, a scope) may be meant to restrict it.
CLAIMS = frozenset({"sub", "exp", "iat", "nbf", "admin", "role"})
#: The ``role`` claim's values: absent means a user (the client endpoint); ``worker`` may
#: only connect to the worker endpoint (``/worker``), and may not be an admin.
ROLES = ("user", "worker")
#: The longest user id (``sub``), in characters: a name's (also at most
#: :data:`~actors._codec.MAX_NAME_BYTES` bytes of UTF-8; :func:`user_id_problem`).
MAX_USER_ID_LENGTH = MAX_LABEL_LENGTH


@attrs.frozen
class Principal:
    user_id: str
    admin: bool
    expires_at: float
    #: ``user`` or ``worker`` (the ``role`` claim; absent: ``user``).
    role: str = "user"


#: The longest lifetime a token is minted with: 100 years. Its ``exp`` must stay a 64-bit
#: integer, the largest a server reads: a longer one was minted, and refused at every use.
MAX_TOKEN_TTL = 100 * 365 * 24 * 3600


def mint_token(
    secret: str,
    user_id: str,
    *,
    admin: bool = False,
    ttl: float = 24 * 3600,
    role: str = "user",
) -> str:
    """A signed token for ``user_id``, valid ``ttl`` seconds, at most :data:`MAX_TOKEN_TTL`
    (a ttl of 0 or less mints an expired token, for tests); ``role="worker"`` makes a worker
    token (for ``jobspine worker``), which cannot also be an admin's."""
    if role not in ROLES or (admin and role != "user"):
        raise ValueError(f"role must be one of {ROLES} (and a worker is never an admin)")
    if not -MAX_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:  # NaN included
        raise ValueError(f"ttl must be at most {MAX_TOKEN_TTL} seconds, not {ttl!r}")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + int(ttl)}
    if admin:
        claims["admin"] = True
    if role != "user":
        claims["role"] = role
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def user_id_problem(user_id: object) -> str | None:
    """Why ``user_id`` cannot name a user (a token's ``sub``), or ``None`` if it can: the
    runtime's own check of a user id (:func:`~actors._codec.check_text` and
    :func:`~actors._codec.check_name`, as every create has it: 1 to 1,024 characters, at most
    1,024 bytes of UTF-8, no NUL or lone surrogate), and no control character (C0, DEL, C1:
    a user id is shown in log lines and on terminals). So ``jobspine token`` mints for
    exactly the users a server accepts and stores (it refused more than 256 characters,
    which the runtime takes). The message names the value's size, never the value."""
    if not isinstance(user_id, str) or not user_id:
        return "a user id must be a non-empty string"
    try:
        check_text(user_id, "a user id")
        check_name(user_id, "a user id")
    except InvalidInputError as exc:
        return str(exc)
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in user_id):  # C0, DEL and C1
        return "a user id must not contain control characters"
    return None


#: Shortest secret HS256 is safe with: its hash's size (RFC 7518, section 3.2).
MIN_SECRET_BYTES = 32


def secret_problem(secret: str) -> str | None:
    """Why ``secret`` is too weak to sign tokens with, or None: shorter than
    :data:`MIN_SECRET_BYTES` bytes of UTF-8. Said in one line by ``jobspine token`` and
    ``serve`` (PyJWT warns with a traceback-like line of its own, which the CLI silences)."""
    size = len(secret.encode("utf-8", "surrogatepass"))
    if size >= MIN_SECRET_BYTES:
        return None
    return (
        f"the secret (JOBSPINE_SECRET, or the config file's) is {size} bytes, shorter than"
        f" the {MIN_SECRET_BYTES} bytes recommended for HS256 (RFC 7518, 3.2), so its tokens"
        " are easier to forge: use a longer one"
        " (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    )


def verify_token(secret: str, token: str) -> Principal:
    """The principal of a valid token. Raises :class:`ProtocolError` ``auth_failed`` for a bad
    signature, another algorithm (``alg: none`` included), malformed or unknown claims, a
    token not yet valid; ``token_expired`` for an expired one."""
    try:
        # Signature and algorithm first: nothing in an unsigned payload is worth reading.
        signed = jwt.api_jws.decode_complete(token, secret, algorithms=[ALGORITHM])
    except jwt.PyJWTError as exc:
        raise ProtocolError("auth_failed", f"invalid token: {exc}") from None
    claims = _claims(signed["payload"])
    try:
        jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        raise ProtocolError("token_expired", "the token has expired") from None
    except jwt.PyJWTError as exc:
        raise ProtocolError("auth_failed", f"invalid token: {exc}") from None
    return Principal(
        claims["sub"],
        claims.get("admin", False),
        float(claims["exp"]),
        claims.get("role", "user"),
    )


def _claims(payload: bytes) -> dict[str, Any]:
    """The claims, read strictly and checked for type; raises ``auth_failed``."""
    try:
        claims = loads_strict(payload.decode())
    except UnicodeDecodeError:
        raise _refused("the claims are not UTF-8") from None
    except RefusedJsonError as exc:
        raise _refused(f"claims: {exc.message}") from None
    if not isinstance(claims, dict):
        raise _refused("the claims are not a JSON object")
    unknown = sorted(set(claims) - CLAIMS)
    if unknown:
        raise _refused(f"unknown claim {shown(unknown[0])}; claims: {', '.join(sorted(CLAIMS))}")
    problem = user_id_problem(claims.get("sub"))
    if problem:
        raise _refused(f"'sub': {problem}")
    for name in ("exp", "iat", "nbf"):
        value = claims.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _refused(f"{name!r} must be a number (Unix seconds)")
    if "exp" not in claims:
        raise _refused("the token has no 'exp'")
    if not isinstance(claims.get("admin", False), bool):
        raise _refused("'admin' must be true or false")
    role = claims.get("role", "user")
    if role not in ROLES:
        raise _refused(f"'role' must be one of {', '.join(map(repr, ROLES))}")
    if role == "worker" and claims.get("admin", False):
        raise _refused("a worker token cannot be an admin's")
    return claims


def _refused(message: str) -> ProtocolError:
    return ProtocolError("auth_failed", f"invalid token: {message}")
