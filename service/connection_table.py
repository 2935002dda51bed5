"""Who holds the server's connection slots, and which one makes room for a newcomer at the cap.

At the cap (`limit` open connections) a newcomer is let in if a connection that is only waiting
for a request, or one whose request's body is still arriving, or one whose client has fallen
behind reading its answer, can be closed for it (never one whose request was accepted and whose
client keeps up, never a stream), chosen in this order:

1. the connection that has waited longest, once it has waited `IDLE_EVICTABLE_S`;
2. the longest-waiting one of the address holding the most connections, where it holds at least
   two more than the newcomer's address (so that the swap evens the shares out);
3. the longest-waiting one of the newcomer's own address;
4. of the address holding the most connections, at least two more than the newcomer's, the one
   whose connection has been busy longest with requests (pipelined ones included) and whose
   current request's body is still arriving, whatever its age;
5. the same of the newcomer's own address, when it holds over a quarter of the cap and that
   connection has been busy for `IDLE_EVICTABLE_S` (busy since it connected, or since it last
   waited that long for a request: a request sent 2 ms after the last answer does not make a
   connection young);
6. of the address holding the most connections, at least two more than the newcomer's, the
   connection whose answer its client has not kept up with longest (the server's write buffer
   over its high-water mark): a client reading 100 KB/s of pipelined 1.5 MB answers on each of
   512 connections kept every slot with requests already accepted (a re-probe), which the send
   timeout, that needs no progress at all, never cut;
7. the same of the newcomer's own address, when it holds over a quarter of the cap (a slow reader
   behind the same NAT as the newcomer shut it out: a third re-probe).

A connection whose body is still arriving was never accepted: it is answered 503 (retry) and
closed, as at shutdown. Without 4 and 5 one address held every slot for the body timeout with
requests that sent their headers and one byte of a body (512 sockets; every other client got
503 for 30 s at a time, again and again: a hostile probe). Its re-probe beat a first form of the
rule: a minimum age of the body let one address keep every body under a second old (each request
finished and the next pipelined behind it every 0.9 s, or each connection re-opened), and an
address counted as a hog only past a quarter of the cap let four addresses of a quarter each fill
it (rules 2 and 4 compare the holder with the newcomer's address now, so shares tend to equal).

Addresses are compared by `share_key`: an IPv6 address by its /64 network, which one subscriber
gets whole (a probe counted that one /64 beats any per-address share); an IPv4 address as itself,
since one /24 holds many unrelated clients. A client with as many networks as the cap has slots
still fills it, as it would any per-address share.

The third is what lets a client share an address with a hog (behind NAT or a proxy every client
has one address): one client re-opening 1,200 silent sockets as fast as they were closed kept the
cap full of connections under a second old, and 92–96 % of another client's requests from the
same address got 503 (a hostile probe). A newcomer now takes the place of its own address's
connection that has waited longest, so a hog gains no slot by re-opening, and a client that sends
its request as soon as it connects is served.

The waiting connections are kept in the order they began to wait (at connect, or when their last
answer went out), in one ordered dict for everyone and one per address, so the longest-waiting one
is at the front; a connection leaves them while its request is served. Addresses are kept in
buckets by the connections they hold, so the largest holders are found without a walk of every
address. Only rules 4 to 7 walk a line (the chosen address's bodies in progress, or its answers
behind, for the earliest), and only at the cap once the waiting ones are exhausted. The look before this
walked every connection (~300 µs at 512, in Python), which a connection flood paid per connect.
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

def share_key(host: str | None) -> str | None:
    """Whose share a connection, stream or job counts in: an IPv6 address's /64 (an IPv4-mapped one
    as its IPv4 address), anything else as given."""
    if host is None or ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def client_share_key(client: tuple[str, int] | None) -> str | None:
    """The share key of a connection's peer (uvicorn's `client`: host and port, or None for a
    socket with no address)."""
    return share_key(client[0]) if client else None


def join(lines: dict[str | None, dict["Slot", None]], slot: "Slot") -> None:
    """Puts `slot` in its address's line of `lines`."""
    lines.setdefault(slot.address, {})[slot] = None


def leave(lines: dict[str | None, dict["Slot", None]], slot: "Slot") -> None:
    """Takes `slot` out of its address's line of `lines` (and the line out once it is empty)."""
    line = lines.get(slot.address)
    if line is not None and line.pop(slot, False) is not False and not line:
        del lines[slot.address]


IDLE_EVICTABLE_S = 1.0  # at the cap, a connection waiting this long for a request may be closed for any newcomer


class Slot(Protocol):
    """What the table needs of a connection (the HTTP protocol, or a WebSocket, which never waits)."""

    waiting_since: float  # since it connected or its last answer went out
    busy_since: float  # since it connected, or began a request after waiting `IDLE_EVICTABLE_S` for one
    stalled_since: float  # since its client stopped keeping up with its answer (the write buffer over its high-water mark)

    address: str | None  # its client's share key, fixed when it connected

    def gone(self) -> bool:
        """Closed or closing, or refused: it holds no slot any more."""

    def make_room(self) -> None:
        """Closes this connection for a newcomer: a waiting one at once, one whose body is still
        arriving once it has been answered 503, one whose client does not keep up with its answer
        by an abort."""


STREAM_OPENINGS_PER_S = 1.0  # fresh WebSocket bursts an address earns a second, past `STREAM_OPENING_BURST` at once
STREAM_OPENING_BURST = 16.0  # (an address may hold 16 streams at the defaults: all of them open with a whole burst)
PRUNE_OPENINGS_PAST = 4096  # addresses remembered before those whose openings have refilled are forgotten
PRUNE_EVERY_OPENINGS = 256  # past it, the scan runs once per this many openings


class ConnectionTable:
    """The slots of one server (one per `--workers` front), kept on uvicorn's server state."""

    def __init__(self, limit: int) -> None:
        self.openings: dict[str | None, tuple[float, float]] = {}  # address -> (WebSocket openings left, when counted)
        self.openings_since_prune = 0
        self.limit = limit
        self.quarter = limit // 4  # an address holding more may lose a body in progress to its own newcomer (rule 5)
        self.held: dict[str | None, int] = {}  # address -> slots it holds
        self.holding: dict[int, set[str | None]] = {}  # slots held -> the addresses that hold that many
        self.members: set[Slot] = set()
        self.waiting: OrderedDict[Slot, None] = OrderedDict()  # longest waiting first
        self.waiting_by_address: dict[str | None, OrderedDict[Slot, None]] = {}
        self.receiving_by_address: dict[str | None, dict[Slot, None]] = {}  # requests whose bodies are arriving
        self.stalled_by_address: dict[str | None, dict[Slot, None]] = {}  # answers their clients have not kept up with

    def __len__(self) -> int:
        return len(self.members)

    def opening_allowance(self, address: str | None, now: float) -> float:
        """The share (0 to 1) of a fresh connection's message bursts that a WebSocket connection
        of `address` opened `now` gets: whole for an address's first streams, then one whole
        burst a second between them. Each new connection started with a whole burst, so a client
        that hung up and reconnected in a loop sent ~272,000 frames a second from one socket,
        past the per-connection rate 133 times over (a re-probe)."""
        left, then = self.openings.get(address, (STREAM_OPENING_BURST, now))
        left = min(STREAM_OPENING_BURST, left + (now - then) * STREAM_OPENINGS_PER_S)
        granted = min(1.0, left)
        self.openings[address] = (left - granted, now)
        self.openings_since_prune += 1
        if len(self.openings) > PRUNE_OPENINGS_PAST and self.openings_since_prune >= PRUNE_EVERY_OPENINGS:
            self.openings_since_prune = 0  # (a scan every so many openings, not one per opening past the threshold)
            full = [key for key, (held, at) in self.openings.items() if held + (now - at) * STREAM_OPENINGS_PER_S >= STREAM_OPENING_BURST]
            for key in full:  # an address whose openings have refilled is as good as new: forgotten
                del self.openings[key]
        return granted

    def __contains__(self, slot: Slot) -> bool:
        return slot in self.members

    def count(self, address: str | None, change: int) -> None:
        """`address` holds `change` more slots (or fewer), in `held` and in its bucket."""
        before = self.held.get(address, 0)
        after = before + change
        if before:
            bucket = self.holding[before]
            bucket.discard(address)
            if not bucket:
                del self.holding[before]
        if after:
            self.held[address] = after
            self.holding.setdefault(after, set()).add(address)
        else:
            del self.held[address]

    def heavier_than(self, address: str | None) -> list[str | None]:
        """The addresses holding at least two more slots than `address`, the largest holders first."""
        floor = self.held.get(address, 0) + 2
        return [other for held in sorted((h for h in self.holding if h >= floor), reverse=True) for other in self.holding[held]]

    def add(self, slot: Slot, waiting: bool = True) -> None:
        self.members.add(slot)
        self.count(slot.address, 1)
        if waiting:
            self.began_waiting(slot)

    def remove(self, slot: Slot) -> None:
        """Idempotent: every path that ends a slot calls it."""
        if slot not in self.members:
            return
        self.members.discard(slot)
        self.began_serving(slot)
        self.body_arrived(slot)
        self.caught_up(slot)
        self.count(slot.address, -1)

    def began_waiting(self, slot: Slot) -> None:
        """Connected, or its answer went out: now the connection that has waited least."""
        if slot in self.members:
            self.waiting.pop(slot, None)
            self.waiting[slot] = None
            line = self.waiting_by_address.setdefault(slot.address, OrderedDict())
            line.pop(slot, None)
            line[slot] = None

    def began_serving(self, slot: Slot) -> None:
        """A request began: never closed for a newcomer until its answer went out."""
        if self.waiting.pop(slot, False) is not False:
            line = self.waiting_by_address[slot.address]
            del line[slot]
            if not line:
                del self.waiting_by_address[slot.address]

    def began_receiving(self, slot: Slot) -> None:
        """Its request's headers are in and its body is to come: not accepted yet."""
        if slot in self.members:
            join(self.receiving_by_address, slot)

    def body_arrived(self, slot: Slot) -> None:
        """Its request's body is whole (or the connection is gone): never closed for a newcomer now."""
        leave(self.receiving_by_address, slot)

    def fell_behind(self, slot: Slot) -> None:
        """Its client stopped keeping up with what it is sent."""
        if slot in self.members:
            join(self.stalled_by_address, slot)

    def caught_up(self, slot: Slot) -> None:
        leave(self.stalled_by_address, slot)

    def admit(self, newcomer: Slot, now: float) -> bool:
        """Whether the newcomer gets a slot, after closing a waiting connection if the cap is full."""
        if len(self) >= self.limit:
            victim = self.victim_for(newcomer.address, now)
            if len(self) >= self.limit:  # (the looks may have dropped slots already gone, and made room)
                if victim is None:
                    return False
                self.remove(victim)
                victim.make_room()
        self.add(newcomer)
        return True

    def victim_for(self, address: str | None, now: float) -> Slot | None:
        """The waiting connection a newcomer from `address` may take the place of, in the module's order."""
        looks = (lambda: self.longest_waiting(self.waiting, now, at_least=IDLE_EVICTABLE_S),
                 lambda: self.from_a_hog(address, now),
                 lambda: self.longest_waiting(self.waiting_by_address.get(address), now),
                 lambda: self.of_a_heavier_address(address, lambda hog: self.busy_longest(self.receiving_by_address.get(hog), now, 0.0)),
                 lambda: self.busy_longest(self.receiving_by_address.get(address), now, IDLE_EVICTABLE_S) if self.held.get(address, 0) > self.quarter else None,
                 lambda: self.of_a_heavier_address(address, lambda hog: self.furthest_behind(self.stalled_by_address.get(hog))),
                 lambda: self.furthest_behind(self.stalled_by_address.get(address)) if self.held.get(address, 0) > self.quarter else None)
        for look in looks:
            if len(self) < self.limit:
                return None  # room made by dropping slots found gone
            if (victim := look()) is not None:
                return victim
        return None

    def of_a_heavier_address(self, address: str | None, pick: Callable[[str | None], Slot | None]) -> Slot | None:
        """What `pick` finds among an address's connections, for the first of the addresses holding
        two more than `address` (the largest holders first) where it finds one."""
        for hog in self.heavier_than(address):
            if (victim := pick(hog)) is not None:
                return victim
        return None

    def from_a_hog(self, address: str | None, now: float) -> Slot | None:
        return self.of_a_heavier_address(address, lambda hog: self.longest_waiting(self.waiting_by_address.get(hog), now))

    def earliest(self, line: dict[Slot, None] | None, since: Callable[[Slot], float]) -> Slot | None:
        """The connection of a line with the earliest `since`; slots found gone on the way are dropped."""
        for slot in [slot for slot in line or () if slot.gone()]:
            self.remove(slot)
        return min(line or (), key=since, default=None)

    def furthest_behind(self, line: dict[Slot, None] | None) -> Slot | None:
        """The connection of a line (answers their clients have not kept up with) behind longest."""
        return self.earliest(line, lambda slot: slot.stalled_since)

    def busy_longest(self, line: dict[Slot, None] | None, now: float, at_least: float) -> Slot | None:
        """The connection of a line (requests whose bodies are arriving) busy longest, if for `at_least`."""
        oldest = self.earliest(line, lambda slot: slot.busy_since)
        return oldest if oldest is not None and now - oldest.busy_since >= at_least else None

    def longest_waiting(self, line: OrderedDict[Slot, None] | None, now: float, at_least: float = 0.0) -> Slot | None:
        """The front of a waiting line, if it has waited `at_least`; slots found gone on the way
        are dropped (their connection_lost has not run yet)."""
        while line:
            slot = next(iter(line))
            if not slot.gone():
                return slot if now - slot.waiting_since >= at_least else None
            self.remove(slot)
        return None
