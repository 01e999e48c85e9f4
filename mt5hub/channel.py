"""A conflating channel: trio's memory channel, but a newer item of a slot replaces the waiting one.

`open_conflating_channel` returns a send and a receive side shaped like trio's memory channels
(`send_nowait`, `receive`, `receive_nowait`, `aclose`, `statistics()`, `EndOfChannel` once the
sender is closed and everything was taken, `ClosedResourceError` on a side used after its own
close, `BrokenResourceError` when sending to a receiver that is gone). Each item may belong to a
slot (`slot_of(item)`, e.g. one table's updates): while an item of that slot waits, a newer one
takes its place and its turn, so a reader that falls behind skips straight to the latest item of
each slot instead of working through stale ones. Items without a slot (a snapshot, a ping, an
error frame) are kept in order, at most `max_unslotted` of them (`trio.WouldBlock` past that).

Why not `trio.open_memory_channel` itself: its buffer is a FIFO that cannot replace an item, so a
slow viewer would be handed every stale update in turn (or, with a buffer of 0, would make the
publisher wait). See docs/decisions/001-conflating-channel.md.

One receiving task at a time; no `clone()`. With `conflate_from=n`, items of a slot replace each
other only once `n` items are waiting (a queue that conflates only when it has grown long).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import attrs
import trio

T = TypeVar("T")
Slot = Hashable


@attrs.frozen
class ChannelStatistics:
    current_buffer_used: int  # items waiting, slotted or not
    max_unslotted: float
    conflated: int  # items replaced by a newer one of their slot, since the channel opened
    open_send_channels: int
    open_receive_channels: int
    tasks_waiting_receive: int


@attrs.define(eq=False)
class _State(Generic[T]):
    max_unslotted: float
    conflate_from: int
    slot_of: Callable[[T], Slot | None]
    # In order of arrival; keyed by slot when always conflating, else by a serial number.
    pending: dict[Any, tuple[Slot | None, T]] = attrs.Factory(dict)
    newest: dict[Slot, int] = attrs.Factory(dict)  # slot -> key of its newest waiting item
    unslotted: int = 0
    serial: int = 0
    conflated: int = 0
    send_closed: bool = False
    receive_closed: bool = False
    lot: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)


def open_conflating_channel(
    max_unslotted: float,
    slot_of: Callable[[T], Slot | None],
    *,
    conflate_from: int = 0,
) -> tuple[ConflatingSendChannel[T], ConflatingReceiveChannel[T]]:
    """A new channel: its send side and its receive side."""
    if max_unslotted != math.inf and (max_unslotted < 0 or int(max_unslotted) != max_unslotted):
        raise ValueError("max_unslotted must be a non-negative integer or math.inf")
    state: _State[T] = _State(max_unslotted, conflate_from, slot_of)
    return ConflatingSendChannel(state), ConflatingReceiveChannel(state)


class ConflatingSendChannel(Generic[T]):
    def __init__(self, state: _State[T]) -> None:
        self._state = state
        self._closed = False

    def send_nowait(self, value: T) -> bool:
        """Add `value`; True if it replaced a waiting item of its slot (conflated).

        Never waits. Raises trio.WouldBlock for an item without a slot when `max_unslotted`
        of them wait already (the caller decides what a dropped item means).
        """
        state = self._state
        if self._closed:
            raise trio.ClosedResourceError
        if state.receive_closed:
            raise trio.BrokenResourceError
        slot = state.slot_of(value)
        pending = state.pending
        if slot is None:
            if state.unslotted >= state.max_unslotted:
                raise trio.WouldBlock
            state.unslotted += 1
            state.serial += 1
            pending[state.serial] = (None, value)
        elif state.conflate_from == 0:  # always conflating: the slot is the key (a dict op)
            if slot in pending:
                pending[slot] = (slot, value)  # its place in line is kept
                state.conflated += 1
                return True
            pending[slot] = (slot, value)
        else:  # a queue until conflate_from wait: the newest item of each slot is remembered
            key = state.newest.get(slot)
            if key is not None and len(pending) >= state.conflate_from:
                pending[key] = (slot, value)
                state.conflated += 1
                return True
            state.serial += 1
            pending[state.serial] = (slot, value)
            state.newest[slot] = state.serial
        if state.lot:
            state.lot.unpark()
        return False

    async def send(self, value: T) -> None:
        """send_nowait, with a checkpoint (a conflating channel never makes a sender wait)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self.send_nowait(value)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def close(self) -> None:
        """The receiver takes what is waiting, then gets EndOfChannel."""
        if not self._closed:
            self._closed = self._state.send_closed = True
            self._state.lot.unpark_all()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> ChannelStatistics:
        return _statistics(self._state)


class ConflatingReceiveChannel(Generic[T]):
    def __init__(self, state: _State[T]) -> None:
        self._state = state
        self._closed = False

    def receive_nowait(self) -> T:
        """The oldest waiting item; trio.WouldBlock if none (EndOfChannel once the sender has
        closed and nothing is left)."""
        state = self._state
        if self._closed:
            raise trio.ClosedResourceError
        if not state.pending:
            raise trio.EndOfChannel if state.send_closed else trio.WouldBlock
        key = next(iter(state.pending))
        slot, value = state.pending.pop(key)
        if slot is None:
            state.unslotted -= 1
        elif state.conflate_from and state.newest.get(slot) == key:
            del state.newest[slot]
        return value

    async def receive(self) -> T:
        """The oldest waiting item, waiting for one if need be. A checkpoint on every path; when
        it waited, it returns the item it was woken for with no other task run in between."""
        await trio.lowlevel.checkpoint_if_cancelled()
        state = self._state
        if not (state.pending or self._closed or state.send_closed):
            while not (state.pending or self._closed or state.send_closed):
                await state.lot.park()  # a checkpoint
            return self.receive_nowait()
        value = self.receive_nowait()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return value

    def __aiter__(self) -> ConflatingReceiveChannel[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Drop what is waiting; senders get BrokenResourceError from now on."""
        if not self._closed:
            self._closed = self._state.receive_closed = True
            self._state.pending.clear()
            self._state.newest.clear()
            self._state.unslotted = 0
            self._state.lot.unpark_all()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def __len__(self) -> int:
        return len(self._state.pending)

    def statistics(self) -> ChannelStatistics:
        return _statistics(self._state)


def _statistics(state: _State[T]) -> ChannelStatistics:
    return ChannelStatistics(
        current_buffer_used=len(state.pending),
        max_unslotted=state.max_unslotted,
        conflated=state.conflated,
        open_send_channels=0 if state.send_closed else 1,
        open_receive_channels=0 if state.receive_closed else 1,
        tasks_waiting_receive=len(state.lot),
    )
