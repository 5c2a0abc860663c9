"""Authentication: HS256 JWTs (PyJWT) carried in the first frame, never in the URL."""

from __future__ import annotations

import time

import attrs
import jwt

from ._protocol import ProtocolError

__all__ = ["Principal", "mint_token", "verify_token"]

ALGORITHM = "HS256"


@attrs.frozen
class Principal:
    user_id: str
    admin: bool
    expires_at: float


def mint_token(secret: str, user_id: str, *, admin: bool = False, ttl: float = 24 * 3600) -> str:
    now = int(time.time())
    claims = {"sub": user_id, "iat": now, "exp": now + int(ttl)}
    if admin:
        claims["admin"] = True
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str) -> Principal:
    """Check signature, algorithm (HS256 only: ``alg: none`` is refused) and expiry."""
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]}
        )
    except jwt.ExpiredSignatureError:
        raise ProtocolError("token_expired", "the token has expired") from None
    except jwt.PyJWTError as exc:
        raise ProtocolError("auth_failed", f"invalid token: {exc}") from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise ProtocolError("auth_failed", "invalid token: 'sub' must be a non-empty string")
    return Principal(subject, claims.get("admin") is True, float(claims["exp"]))
