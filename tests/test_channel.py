"""mt5hub.channel: a conflating channel behaves like trio's memory channels, but for conflation."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from mt5hub.channel import open_conflating_channel

Item = tuple[str | None, int]  # (slot, value); slot None: never conflated


def slot_of(item: Item) -> str | None:
    return item[0]


def drain(receive: object) -> list[Item]:
    got: list[Item] = []
    while True:
        try:
            got.append(receive.receive_nowait())  # type: ignore[attr-defined]
        except trio.WouldBlock:
            return got


def test_a_newer_item_of_a_slot_replaces_the_waiting_one_and_keeps_its_turn() -> None:
    send, receive = open_conflating_channel(8, slot_of)
    assert [send.send_nowait(i) for i in [("A", 1), ("B", 1), ("A", 2), (None, 0)]] == [
        False,
        False,
        True,
        False,
    ]
    assert drain(receive) == [("A", 2), ("B", 1), (None, 0)]
    send.send_nowait(("A", 3))  # A is not waiting any more: it queues at the end
    assert drain(receive) == [("A", 3)]
    assert send.statistics().conflated == 1


def test_items_without_a_slot_are_kept_in_order_and_bounded() -> None:
    send, receive = open_conflating_channel(2, slot_of)
    send.send_nowait((None, 1))
    send.send_nowait((None, 2))
    with pytest.raises(trio.WouldBlock):
        send.send_nowait((None, 3))
    send.send_nowait(("A", 1))  # slotted items are bounded by their slots, not by this
    assert drain(receive) == [(None, 1), (None, 2), ("A", 1)]
    send.send_nowait((None, 4))  # room again
    assert drain(receive) == [(None, 4)]


def test_conflate_from_keeps_a_queue_until_it_grows_long() -> None:
    send, receive = open_conflating_channel(math.inf, slot_of, conflate_from=3)
    for n in range(3):
        assert not send.send_nowait(("A", n))  # below 3 waiting: queued, each kept
    assert send.send_nowait(("A", 3))  # 3 waiting: replaces the newest A, in its place
    assert drain(receive) == [("A", 0), ("A", 1), ("A", 3)]


async def test_receive_checkpoints_on_every_path() -> None:
    send, receive = open_conflating_channel(4, slot_of)
    send.send_nowait(("A", 1))
    with trio.testing.assert_checkpoints():
        assert await receive.receive() == ("A", 1)
    with trio.testing.assert_checkpoints(), trio.move_on_after(0.01):
        await receive.receive()  # nothing comes: it waited
    with trio.CancelScope() as scope:
        scope.cancel()
        send.send_nowait(("A", 2))
        with pytest.raises(trio.Cancelled):
            await receive.receive()  # cancelled even with an item ready
    assert receive.receive_nowait() == ("A", 2)  # and it was not taken


async def test_a_waiting_receiver_is_woken_by_the_first_item(autojump_clock: object) -> None:
    send, receive = open_conflating_channel(4, slot_of)
    got: list[Item] = []
    async with trio.open_nursery() as nursery:

        async def take() -> None:
            got.append(await receive.receive())

        nursery.start_soon(take)
        await trio.sleep(1)
        assert receive.statistics().tasks_waiting_receive == 1
        send.send_nowait(("A", 1))
    assert got == [("A", 1)]


async def test_closing_the_sender_ends_the_channel_after_what_waits() -> None:
    send, receive = open_conflating_channel(4, slot_of)
    send.send_nowait(("A", 1))
    await send.aclose()
    with pytest.raises(trio.ClosedResourceError):
        send.send_nowait(("A", 2))
    assert [item async for item in receive] == [("A", 1)]
    with pytest.raises(trio.EndOfChannel):
        await receive.receive()
    assert send.statistics().open_send_channels == 0


async def test_closing_the_receiver_drops_what_waits_and_breaks_the_sender() -> None:
    send, receive = open_conflating_channel(4, slot_of)
    send.send_nowait(("A", 1))
    await receive.aclose()
    with pytest.raises(trio.ClosedResourceError):
        receive.receive_nowait()
    with pytest.raises(trio.BrokenResourceError):
        send.send_nowait(("A", 2))
    stats = send.statistics()
    assert (stats.current_buffer_used, stats.open_receive_channels) == (0, 0)


async def test_a_waiting_receiver_learns_of_the_senders_close() -> None:
    send, receive = open_conflating_channel(4, slot_of)
    async with trio.open_nursery() as nursery:
        ended = trio.Event()

        async def take() -> None:
            with pytest.raises(trio.EndOfChannel):
                await receive.receive()
            ended.set()

        nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        send.close()
    assert ended.is_set()


@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["A", "B", "C"]), st.integers(0, 10**6)),
            st.just(("take", 0)),
        )
    )
)
def test_a_reader_never_goes_back_and_ends_with_the_latest_of_every_slot(
    steps: list[tuple[str, int]],
) -> None:
    """Whatever the interleaving of sends and reads: per slot, what is read is in the order sent
    (never an older item after a newer one), and the last read is the last sent."""
    send, receive = open_conflating_channel(math.inf, slot_of)
    sent: dict[str | None, list[int]] = {}
    read: list[Item] = []
    for n, (slot, _) in enumerate(steps):
        if slot == "take":
            read += drain(receive)
        else:
            send.send_nowait((slot, n))
            sent.setdefault(slot, []).append(n)
    read += drain(receive)
    for slot, values in sent.items():
        got = [v for s, v in read if s == slot]
        assert got == sorted(got) and set(got) <= set(values)
        assert got[-1] == values[-1]
    conflated = sum(len(v) for v in sent.values()) - len(read)
    assert send.statistics().conflated == conflated
