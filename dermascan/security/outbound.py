"""Where DermaScan may connect out to: the one address rule of every outbound channel.

A host an administrator or a program names (a callback URL, a PACS destination) could point at
DermaScan's own host or at the cloud's metadata service and turn the channel against the inside.
The rule is checked twice: when the address is saved (a literal IP in it) and again at connect
time, after resolving, on every address the name resolves to — so a name that later resolves
elsewhere (DNS rebinding) is still refused, and the connection goes to the address that was
checked.

Never allowed, unless an operator setting lists the host (a name, an address or a network):
loopback, link-local (169.254.0.0/16, fe80::/10: the metadata service), unspecified (0.0.0.0,
::), multicast and reserved addresses, and the IPv4-mapped IPv6 forms of all of these.
``private`` decides whether RFC 1918 / ULA addresses are allowed: hospital PACS live on private
networks, so destinations allow them; callbacks go to the internet and do not.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

FORBIDDEN = ("loopback", "link_local", "unspecified", "multicast", "reserved")


class OutboundRefused(ValueError):
    """An address DermaScan will not connect to; the message says which and why."""


def listed_hosts(setting: str) -> list[str]:
    """A comma-separated operator setting → lower-case entries."""
    return [h.strip().lower() for h in (setting or "").split(",") if h.strip()]


def _unmapped(ip):
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def kind_of(ip, private_allowed: bool) -> str | None:
    """Why ``ip`` is refused ("loopback", "link-local", …), or None when it may be reached."""
    ip = _unmapped(ip)
    for name in FORBIDDEN:
        if getattr(ip, f"is_{name}", False):
            return name.replace("_", "-")
    if isinstance(ip, ipaddress.IPv6Address) and (ip.sixtofour or ip.teredo):
        return "tunnelled"  # 2002::/16 and Teredo wrap an IPv4 address that was not checked
    if not private_allowed and not ip.is_global:
        return "private"
    return None


@dataclass(frozen=True)
class Policy:
    """The rule for one kind of outbound channel: private networks allowed or not, and the hosts
    an operator listed as exceptions."""

    private_allowed: bool
    listed: tuple[str, ...] = ()
    what: str = "destination"

    def is_listed(self, host: str, ip=None) -> bool:
        host = (host or "").lower().strip("[]").rstrip(".")
        for entry in self.listed:
            if entry == host:
                return True
            if ip is not None:
                try:
                    if _unmapped(ip) in ipaddress.ip_network(entry, strict=False) or ip in ipaddress.ip_network(
                        entry, strict=False
                    ):
                        return True
                except ValueError:
                    continue
        return False

    def check_host(self, host: str) -> None:
        """At save time: a literal address (or ``localhost``) that the rule refuses raises."""
        host = (host or "").strip().strip("[]")
        if not host:
            raise OutboundRefused(f"the {self.what} needs a host")
        if self.is_listed(host):
            return
        if host.lower().rstrip(".") in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
            raise OutboundRefused(f"the {self.what} {host!r} is this machine (loopback), which DermaScan does not call")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            try:  # the shorthand forms of an IPv4 address (127.1, 2130706433, 0x7f000001) resolve too
                ip = ipaddress.ip_address(socket.inet_ntoa(socket.inet_aton(host)))
            except (OSError, ValueError):
                return  # a name: checked again when it is resolved, at connect time
        kind = kind_of(ip, self.private_allowed)
        if kind:
            raise OutboundRefused(f"the {self.what} {host!r} is a {kind} address, which DermaScan does not call")

    def resolve(self, host: str, port: int) -> list[tuple]:
        """At connect time: every address ``host`` resolves to that the rule allows, as
        ``getaddrinfo`` tuples (connect to these, not to the name). Raises OutboundRefused when
        it resolves only to refused addresses, OSError when it does not resolve."""
        allowed, refused = [], None
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            ip = ipaddress.ip_address(address[0].split("%")[0])
            why = kind_of(ip, self.private_allowed)
            if why and not self.is_listed(host, ip):
                refused = OutboundRefused(f"{host} resolves to a {why} address ({ip}), which DermaScan does not call")
                continue
            allowed.append((family, kind, proto, address))
        if not allowed:
            raise refused or OSError(f"{host} did not resolve")
        return allowed

    def connect(self, host: str, port: int, timeout: float | None) -> socket.socket:
        """A TCP connection to the first allowed address of ``host`` (checked at connect time)."""
        error: OSError | None = None
        for family, kind, proto, address in self.resolve(host, port):
            sock = socket.socket(family, kind, proto)
            sock.settimeout(timeout)
            try:
                sock.connect(address)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error or OSError(f"no connection to {host}:{port}")
