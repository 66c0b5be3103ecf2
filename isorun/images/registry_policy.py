"""Which registries a pull made on someone else's behalf may reach, and as whom.

The daemon pulls as root from the host's network. Left open, an API-key tenant naming
`169.254.169.254/x` or `10.0.0.5:2375/x` makes it reach addresses only the host can (request
forgery), and the operator's registry credentials would be spent on any registry a tenant
names. A policy lists what a tenant may name:

- `public`: any registry all of whose addresses are public unicast, pulled anonymously (the
  operator's auth file is not offered to a registry the tenant chose);
- registries by name as references write them (`registry.internal:5000`, `10.0.0.5:5000`):
  reached whatever their address, with the operator's credentials for them.

This check, on the reference, refuses before any request is made. skopeo then follows the
registry's redirects and token realm by itself: a `public` pull therefore also runs confined,
every connection checked the same way (pull_egress.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Literal

from isorun.errors import ConfigError
from isorun.images.errors import (
    InvalidReferenceError,
    RegistryRefusedError,
    RegistryUnreachableError,
)
from isorun.images.reference import DEFAULT_REGISTRY, ImageRef, parse_reference

PUBLIC = "public"
RESOLVE_TIMEOUT_S = 10.0
# Docker Hub's references say docker.io; its API is served from this name.
_API_HOST = {DEFAULT_REGISTRY: "registry-1.docker.io"}
_log = logging.getLogger("isorun.images")

PullAs = Literal["anonymous", "operator"]


@dataclass(frozen=True)
class RegistryPolicy:
    public: bool
    named: frozenset[str]

    @classmethod
    def parse(cls, text: str, setting: str = "registry policy") -> RegistryPolicy:
        """From `public,registry.internal:5000,...`; an empty text allows no registry."""
        named: set[str] = set()
        public = False
        for item in (s.strip() for s in text.split(",")):
            if item == PUBLIC:
                public = True
            elif item:
                named.add(_registry_of(item, setting))
        return cls(public, frozenset(named))

    def describe(self) -> str:
        parts = ([PUBLIC] if self.public else []) + sorted(self.named)
        return ",".join(parts) or "(none)"

    async def check(self, ref: ImageRef) -> PullAs:
        """Raise RegistryRefusedError unless ref's registry may be reached; say whether the
        operator's credentials may be offered to it."""
        known = self.check_without_dns(ref)
        if known is not None:
            return known
        host, port = _split_host(ref.registry)
        api_host = _API_HOST.get(ref.registry, host)
        self._refuse_if_out_of_reach(ref, api_host, await resolve(api_host, port))
        return "anonymous"

    def check_without_dns(self, ref: ImageRef) -> PullAs | None:
        """check() as far as it goes without resolving a name: raises when the registry is
        refused by name or at a literal address; None when whether it is public depends on
        where its name resolves (a stored image's cache hit must not wait on DNS)."""
        if ref.transport != "registry":
            return "operator"  # no network: the caller decides who may name a host path
        if ref.registry.lower() in self.named:
            return "operator"
        if not self.public:
            raise RegistryRefusedError(
                f"registry {ref.registry} is not one this pull may reach (allowed: "
                f"{self.describe()})"
            )
        host, _ = _split_host(ref.registry)
        api_host = _API_HOST.get(ref.registry, host)
        if not _is_literal(api_host):
            return None
        self._refuse_if_out_of_reach(ref, api_host, [ipaddress.ip_address(api_host).compressed])
        return "anonymous"

    def _refuse_if_out_of_reach(self, ref: ImageRef, host: str, addresses: list[str]) -> None:
        why = out_of_reach(host, addresses)
        if why is not None:
            raise RegistryRefusedError(
                f"registry {ref.registry} is {why}; pulls here may reach only public "
                f"registries and these by name: {', '.join(sorted(self.named)) or '(none)'}"
            )


def _registry_of(item: str, setting: str) -> str:
    try:
        ref = parse_reference(f"{item}/policy-entry")
    except InvalidReferenceError as exc:
        raise ConfigError(f"{setting}: {item!r} is not a registry host[:port] ({exc})") from None
    if ref.transport != "registry" or ref.repository.removeprefix("library/") != "policy-entry":
        raise ConfigError(
            f"{setting}: {item!r} is not a registry host[:port] (write `{PUBLIC}` or names "
            "like registry.example.com:5000)"
        )
    return ref.registry.lower()


def _split_host(registry: str) -> tuple[str, int]:
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 443
    host, _, port = registry.partition(":")
    return host, int(port) if port else 443


# getaddrinfo blocks a thread until the resolver gives up, whatever the asyncio timeout:
# threads of their own, so a tenant naming a host whose DNS never answers cannot take the
# loop's default pool (layer unpacking, process kills) from everything else.
_RESOLVERS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")


async def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` names (itself when it is an address literal)."""
    try:
        return [ipaddress.ip_address(host).compressed]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await loop.run_in_executor(
                _RESOLVERS, functools.partial(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
            )
    except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a label IDNA refuses
        raise RegistryUnreachableError(
            f"cannot resolve host {host}: {str(exc) or 'timed out'}"
        ) from None
    return sorted({str(info[4][0]) for info in infos})


def out_of_reach(host: str, addresses: list[str]) -> str | None:
    """Why a tenant's pull may not connect to `host` at one of `addresses` ("at 10.0.0.1,
    which is not a public address"), or None. This host's own addresses are out of reach
    too: a connection from here to its public address reaches services bound to every
    interface, past any firewall rule for traffic from outside.

    The address is named only when the tenant wrote it: what a name resolves to on this
    host's network (an internal DNS name's private address) is the operator's to know, and
    is logged for them, not told to whoever asked."""
    for a in addresses:
        if not _is_public(a):
            why, where = "not a public address", "an address that is not public"
        elif _is_this_host(a):
            why, where = "this host's own address", "this host's own address"
        else:
            continue
        if _is_literal(host):
            return f"at {a}, which is {why}"
        _log.warning("refused a tenant's pull from %s: it resolves to %s, %s", host, a, why)
        return f"at {where} (where its name resolves on this host)"
    return None


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _is_this_host(address: str) -> bool:
    # The route to one of this host's addresses is a local one, whose source is the address
    # itself (a bind test is fooled by ip_nonlocal_bind; no packet is sent for a UDP connect).
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((address, 9))
            return bool(s.getsockname()[0] == address)
    except OSError:
        return False  # no route (or no IPv6 here): not one of ours


# IPv6 prefixes that carry an IPv4 address in their low 32 bits (NAT64 well-known and local
# use, IPv4-compatible, IPv4-translated): a gateway on the path may take them to it.
_IPV4_IN_LOW_BITS = [
    ipaddress.IPv6Network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96")
]
_6TO4 = ipaddress.IPv6Network("2002::/16")


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None and not _is_public(str(inner)):
            return False
    return ip.is_global and not ip.is_multicast


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _6TO4:
        return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    if any(ip in net for net in _IPV4_IN_LOW_BITS):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None
