"""API keys: `isr_<key id>_<secret>`; only sha256(secret) is stored (the secret has 256 bits
of entropy, so a slow KDF adds nothing). Comparison is constant-time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

from isorun.daemon.store import LOCAL_TENANT, Store

PREFIX = "isr_"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(store: Store, tenant_id: str | None = None, name: str = "") -> dict[str, str]:
    """A new key for `tenant_id` (a new tenant when None). The secret is shown only once."""
    tenant = tenant_id or f"t-{uuid.uuid4().hex[:12]}"
    store.add_tenant(tenant, name or tenant)
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    store.add_key(key_id, tenant, _hash(secret), name or tenant)
    return {
        "id": key_id,
        "tenant_id": tenant,
        "name": name or tenant,
        "key": f"{PREFIX}{key_id}_{secret}",
    }


def tenant_for(store: Store, key: str) -> str | None:
    """The tenant a presented key belongs to, or None for any invalid or revoked key."""
    if not key.startswith(PREFIX):
        return None
    key_id, sep, secret = key[len(PREFIX) :].partition("_")
    if not sep or not key_id or not secret or len(key) > 200:
        return None
    row = store.get_key(key_id)
    if row is None:
        return None
    if not hmac.compare_digest(row["hash"], _hash(secret)):
        return None
    if row["tenant_id"] == LOCAL_TENANT:  # minted before that tenant was reserved
        return None
    return str(row["tenant_id"])
