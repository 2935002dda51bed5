"""Which connection makes room at the connection cap (service/connection_table.py). The real
server's behaviour at the cap is tested through HTTP in test_hostile.py; these pin the order of
choice, that a connection being served is never chosen, and that a choice costs the same however
many connections there are."""
from __future__ import annotations

from dataclasses import dataclass

from service.connection_table import ConnectionTable, share_key


@dataclass(eq=False)
class FakeSlot:
    address: str | None
    waiting_since: float
    busy_since: float = 0.0
    stalled_since: float = 0.0
    closing: bool = False
    closed_for_a_newcomer: bool = False
    looked_at: int = 0

    def gone(self) -> bool:
        self.looked_at += 1
        return self.closing

    def make_room(self) -> None:
        self.closed_for_a_newcomer = True


def filled(limit: int, address: str) -> tuple[ConnectionTable, list[FakeSlot]]:
    table = ConnectionTable(limit)
    slots = [FakeSlot(address, i * 0.001) for i in range(limit)]
    for slot in slots:
        assert table.admit(slot, slot.waiting_since)
    return table, slots


def test_a_newcomer_of_the_hogs_own_address_takes_the_place_of_its_longest_waiting_connection():
    table, hog = filled(8, "10.0.0.1")
    newcomer = FakeSlot("10.0.0.1", 0.5)
    assert table.admit(newcomer, 0.5)  # every connection under IDLE_EVICTABLE_S old
    assert [s.closed_for_a_newcomer for s in hog] == [True] + [False] * 7
    assert len(table) == 8 and newcomer in table and hog[0] not in table


def test_an_answer_sends_a_connection_to_the_back_of_the_line():
    table, slots = filled(4, "10.0.0.1")
    table.began_serving(slots[0])
    slots[0].waiting_since = 0.4
    table.began_waiting(slots[0])  # its answer went out just now
    assert table.admit(FakeSlot("10.0.0.1", 0.5), 0.5)
    assert [s.closed_for_a_newcomer for s in slots] == [False, True, False, False]


def test_a_connection_waiting_past_the_idle_bound_goes_first_whoever_comes():
    table = ConnectionTable(4)
    old = FakeSlot("10.0.0.9", 0.0)
    table.admit(old, 0.0)
    hog = [FakeSlot("10.0.0.1", 5.0 + i * 0.01) for i in range(3)]
    for slot in hog:
        table.admit(slot, slot.waiting_since)
    assert table.admit(FakeSlot("10.0.0.1", 5.1), 5.1)
    assert old.closed_for_a_newcomer and not any(s.closed_for_a_newcomer for s in hog)


def test_a_newcomer_of_another_address_takes_from_the_hog_not_from_a_light_address():
    table = ConnectionTable(8)
    light = FakeSlot("10.0.0.7", 0.0)  # the longest waiting, but under the idle bound at 0.5
    table.admit(light, 0.0)
    hog = [FakeSlot("10.0.0.1", 0.1 + i * 0.01) for i in range(7)]
    for slot in hog:
        table.admit(slot, slot.waiting_since)
    assert table.admit(FakeSlot("10.0.0.2", 0.5), 0.5)
    assert not light.closed_for_a_newcomer and hog[0].closed_for_a_newcomer
    # a light address's newcomer with nothing of its own waiting, the hog's connections all busy: refused
    for slot in hog[1:]:
        table.began_serving(slot)
    assert not table.admit(FakeSlot("10.0.0.3", 0.6), 0.6)
    assert not light.closed_for_a_newcomer


def test_where_every_connection_is_being_served_the_newcomer_is_refused_at_the_cost_of_none_of_them():
    table, slots = filled(512, "10.0.0.1")
    for slot in slots:
        table.began_serving(slot)
    for address in ("10.0.0.1", "10.0.0.2"):
        assert not table.admit(FakeSlot(address, 0.6), 0.6)
    assert len(table) == 512 and not any(s.closed_for_a_newcomer for s in slots)
    assert sum(s.looked_at for s in slots) == 0  # no look walked the busy ones (one walked all 512 before)
    slots[300].waiting_since = 0.7
    table.began_waiting(slots[300])  # one answer went out
    assert table.admit(FakeSlot("10.0.0.1", 0.8), 0.8)
    assert slots[300].closed_for_a_newcomer


def receiving(table: ConnectionTable, slots: list[FakeSlot], busy_since: float) -> None:
    """Their connections began a request at `busy_since`, and its body is still to come."""
    for slot in slots:
        table.began_serving(slot)
        slot.busy_since = busy_since
        table.began_receiving(slot)


def test_a_hogs_bodies_still_arriving_make_room_for_another_address_the_one_busy_longest_first():
    """One address held every slot with requests that sent their headers and a byte of body, and
    every other client got 503 for the body timeout (a hostile probe); its re-probe kept each body
    under a second old (a minimum age the rule had then), finishing each request with the next
    one pipelined behind it, which keeps the connection busy since the first."""
    table, hog = filled(8, "10.0.0.1")
    receiving(table, hog, busy_since=0.1)
    hog[3].busy_since = 0.05  # pipelined behind requests since then
    assert table.admit(FakeSlot("10.0.0.2", 0.2), 0.2)  # whatever the body's age
    assert [s.closed_for_a_newcomer for s in hog] == [False] * 3 + [True] + [False] * 4
    table.body_arrived(hog[0])  # a body that is whole: its request is accepted, never closed
    assert table.admit(FakeSlot("10.0.0.3", 0.3), 0.3)
    assert not hog[0].closed_for_a_newcomer and sum(s.closed_for_a_newcomer for s in hog) == 2


def test_four_addresses_of_a_quarter_each_lose_a_slot_to_a_fifth_while_one_holds_two_more_than_it():
    """Four addresses holding a quarter of the cap each were no hog (past a quarter was), and
    filled it with bodies that never came (a re-probe)."""
    table = ConnectionTable(8)
    quarters = [FakeSlot(f"10.0.0.{i // 2 + 1}", 0.0) for i in range(8)]
    for slot in quarters:
        table.admit(slot, 0.0)
    receiving(table, quarters, busy_since=0.0)
    fifth = [FakeSlot("10.0.0.9", 0.1 + i / 100) for i in range(2)]
    assert table.admit(fifth[0], 0.1)
    assert sum(s.closed_for_a_newcomer for s in quarters) == 1
    table.began_serving(fifth[0])
    # the fifth address now holds 1, the others 2, 2, 2 and 1: no one holds two more than it, and a
    # swap would only move the unevenness from one address to another
    assert sorted(table.held.values()) == [1, 1, 2, 2, 2]
    assert not table.admit(fifth[1], 0.11)
    assert sum(s.closed_for_a_newcomer for s in quarters) == 1


def test_a_light_addresss_body_still_arriving_is_not_taken_and_a_hogs_own_newcomer_takes_its_own_once_a_second_busy():
    table = ConnectionTable(8)
    light = [FakeSlot("10.0.0.7", 0.0) for _ in range(2)]  # a quarter of the cap: no more than any newcomer's address but by 2
    hog = [FakeSlot("10.0.0.1", 0.0) for _ in range(6)]
    for slot in light + hog:
        table.admit(slot, 0.0)
    receiving(table, light, busy_since=0.0)
    receiving(table, hog, busy_since=1.5)
    assert not table.admit(FakeSlot("10.0.0.1", 2.0), 2.0)  # the hog's own newcomer: its bodies under a second busy, the light one lighter
    assert not any(s.closed_for_a_newcomer for s in light + hog)
    behind_the_nat = FakeSlot("10.0.0.1", 2.6)
    assert table.admit(behind_the_nat, 2.6)  # a second on: its own address's connection busy longest
    assert [s.closed_for_a_newcomer for s in light + hog] == [False, False, True] + [False] * 5
    table.began_serving(behind_the_nat)  # its request arrived whole
    assert table.admit(FakeSlot("10.0.0.9", 2.7), 2.7)  # another address's newcomer: from the hog, not the light address
    assert not any(s.closed_for_a_newcomer for s in light) and hog[1].closed_for_a_newcomer and not behind_the_nat.closed_for_a_newcomer


def test_answers_a_heavier_address_does_not_keep_up_with_make_room_the_longest_behind_first():
    """A client reading 100 KB/s of pipelined 1.5 MB answers on every connection kept each slot
    with accepted requests, which no rule touched and the send timeout (no progress at all) never
    cut (a re-probe)."""
    table, slow = filled(8, "10.0.0.1")
    for index, slot in enumerate(slow):
        table.began_serving(slot)
        if index % 2:
            slot.stalled_since = 1.0 - index / 10
            table.fell_behind(slot)
    assert table.admit(FakeSlot("10.0.0.2", 2.0), 2.0)
    assert [s.closed_for_a_newcomer for s in slow] == [False] * 7 + [True]  # behind since 0.3, the longest
    table.caught_up(slow[5])
    assert table.admit(FakeSlot("10.0.0.3", 2.1), 2.1)
    assert [s.closed_for_a_newcomer for s in slow] == [False, False, False, True, False, False, False, True]
    # its own address's newcomer (a client behind the same NAT) takes its own address's furthest behind
    # (it was shut out: a third re-probe), where that address holds over a quarter of the cap
    assert table.admit(FakeSlot("10.0.0.1", 2.2), 2.2)
    assert [s.closed_for_a_newcomer for s in slow] == [False, True, False, True, False, False, False, True]


def test_an_ipv6_clients_share_is_its_64_one_subscribers_network():
    assert share_key("2001:db8:1:2:3:4:5:6") == share_key("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert share_key("2001:db8:1:3::1") != share_key("2001:db8:1:2::1")
    assert share_key("::ffff:10.0.0.1") == "10.0.0.1" and share_key("10.0.0.1") == "10.0.0.1" and share_key(None) is None
    table = ConnectionTable(4)
    hog = [FakeSlot(share_key(f"2001:db8:1:2::{i + 1:x}"), 0.0) for i in range(4)]  # four addresses of one /64
    for slot in hog:
        table.admit(slot, 0.0)
    assert table.admit(FakeSlot(share_key("2001:db8:9::1"), 0.1), 0.1) and hog[0].closed_for_a_newcomer


def test_connections_gone_are_dropped_by_a_look_and_free_their_slot():
    table, slots = filled(4, "10.0.0.1")
    slots[0].closing = True  # closed, its connection_lost not yet run
    newcomer = FakeSlot("10.0.0.1", 0.5)
    assert table.admit(newcomer, 0.5)
    assert not any(s.closed_for_a_newcomer for s in slots) and slots[0] not in table and len(table) == 4


def test_removing_is_idempotent_and_leaves_nothing_behind():
    table, slots = filled(4, "10.0.0.1")
    table.began_serving(slots[2])
    for slot in slots:
        table.remove(slot)
        table.remove(slot)
    assert len(table) == 0 and not table.held and not table.holding and not table.waiting and not table.waiting_by_address
    table, slots = filled(4, "10.0.0.1")
    receiving(table, slots, busy_since=0.0)
    for slot in slots:
        table.remove(slot)
    assert not table.receiving_by_address
