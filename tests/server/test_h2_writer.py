"""SerialWriter, the one writer of an HTTP/2 connection, over real socket pairs.

Queuing never waits; the writer sends what all tasks queued in one pass as one write; a
task waits (``wait_below``) only while too much is unwritten; on a cleartext socket the
raw-fd write hands what the kernel refused to trio's send, in order. No sleeps: the tests
wait on the writer's own progress, under fail_after.
"""

from __future__ import annotations

import socket

import attrs
import trio
import trio.testing

from runestone_proxy.server.h2writer import SerialWriter


@attrs.define
class CountingStream(trio.abc.SendStream):
    """Records each send_all (what a coalesced write looks like from the socket's side)."""

    sends: list[bytes] = attrs.Factory(list)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sends.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(a)),
        trio.SocketStream(trio.socket.from_stdlib_socket(b)),
    )


async def test_what_many_tasks_queue_in_one_pass_goes_out_in_one_write(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(5):
        stream = CountingStream()
        writer = SerialWriter(stream, 5.0, on_broken=lambda: None)  # type: ignore[arg-type]
        nursery.start_soon(writer.run)
        await trio.testing.wait_all_tasks_blocked()  # the writer waits for output

        async def respond(n: int) -> None:
            writer.queue(b"frame-%d;" % n)
            await writer.wait_below(1 << 16)  # under the mark: returns at once

        async with trio.open_nursery() as streams:
            for n in range(16):
                streams.start_soon(respond, n)
        await writer.wait_below(0)
        assert len(stream.sends) == 1
        frames = stream.sends[0].split(b";")[:-1]  # trio runs the tasks in any order
        assert sorted(frames) == sorted(b"frame-%d" % n for n in range(16))


async def test_a_slow_reader_holds_up_writers_past_the_mark(nursery: trio.Nursery) -> None:
    with trio.fail_after(5):
        ours, theirs = pair()
        async with ours, theirs:
            writer = SerialWriter(ours, 5.0, on_broken=lambda: None)
            writer.fd = ours.socket.fileno()
            nursery.start_soon(writer.run)
            chunk = bytes(range(256)) * 256  # 64 KiB, far past what the socket buffers hold
            writer.queue(chunk)
            writer.queue(chunk)
            assert writer.backlog == 2 * len(chunk)
            waited = trio.Event()

            async def blocked_writer() -> None:
                await writer.wait_below(len(chunk))
                waited.set()

            nursery.start_soon(blocked_writer)
            await trio.testing.wait_all_tasks_blocked()
            assert not waited.is_set()  # the kernel took a few KiB; 64 KiB are still unwritten
            got = bytearray()
            while len(got) < 2 * len(chunk):
                got += await theirs.receive_some(65536)
            await waited.wait()
            # The raw-fd write took what the kernel would; trio's send the rest, in order.
            assert got == chunk + chunk
            assert writer.backlog == 0
            assert not writer.broken


async def test_a_lone_streams_output_goes_to_the_socket_at_once_and_after_what_is_queued() -> None:
    """``queue(now=True)``: with nothing queued, straight to the fd, no writer task needed;
    behind queued bytes it waits its turn (order is the connection's integrity)."""
    ours, peer = pair()
    async with ours, peer:
        with trio.fail_after(5):
            writer = SerialWriter(ours, 5.0, on_broken=lambda: None, fd=ours.socket.fileno())
            writer.queue(b"alone", now=True)  # no writer task is running at all
            assert writer.backlog == 0
            assert await peer.receive_some(100) == b"alone"
            writer.queue(b"first;")  # for the writer task
            writer.queue(b"second", now=True)  # behind it: queued too
            assert writer.backlog == len(b"first;second")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                got = b""
                while got != b"first;second":
                    got += await peer.receive_some(100)
                nursery.cancel_scope.cancel()
            assert writer.backlog == 0


async def test_what_the_kernel_refuses_of_a_lone_write_is_queued_for_the_writer() -> None:
    ours, peer = pair()  # small socket buffers
    async with ours, peer:
        with trio.fail_after(5):
            writer = SerialWriter(ours, 5.0, on_broken=lambda: None, fd=ours.socket.fileno())
            data = bytes(range(256)) * 4096  # 1 MiB: far more than the buffers hold
            writer.queue(data, now=True)
            assert 0 < writer.backlog < len(data)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                got = bytearray()
                while len(got) < len(data):
                    got += await peer.receive_some(65536)
                nursery.cancel_scope.cancel()
            assert bytes(got) == data
