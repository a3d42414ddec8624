"""Delay, jitter and loss in user space, where the kernel has no `sch_netem` (this machine's and
CI's kernels are built without it): `python -m tests.netem_queue QUEUE DELAY_MS JITTER_MS LOSS_PCT`.

Run it inside a host's network namespace next to an iptables rule that sends the packets to be
shaped to NFQUEUE number QUEUE (tests/netns.py does both). For each queued packet it draws, as
netem does, a loss (LOSS_PCT %) and a delay uniform in DELAY_MS ± JITTER_MS, then gives the
kernel its verdict (drop, or accept once the delay is over). A packet is held in the kernel until
then, so the delay is real: TCP sees the same late, reordered and missing segments it would see
behind netem. Verdicts are by packet id, so they may be given out of order.

It speaks nfnetlink_queue directly (no library): bind the queue, ask for metadata only, read
packet ids, send verdicts. It prints `ready` once bound, and stops on SIGTERM; on its way out the
kernel drops whatever is still queued to it, as a partition would.
"""

from __future__ import annotations

import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NF_DROP = 0
NF_ACCEPT = 1


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    # nlmsghdr (host order), then nfgenmsg: family, version 0, the queue number (big-endian).
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", queue) + attrs
    return (
        struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0, 0) + body
    )


def _attrs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def _check_ack(sock: socket.socket) -> None:
    data = sock.recv(65536)
    _, kind, _, _, _ = struct.unpack_from("=IHHII", data, 0)
    if kind == NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", data, 16)
        if error != 0:
            raise OSError(-error, f"nfqueue config refused: {os.strerror(-error)}")


def run(queue: int, delay_ms: float, jitter_ms: float, loss_pct: float) -> None:
    stop = [False]

    def on_term(_sig: int, _frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_term)
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((0, 0))
    bind = _attr(NFQA_CFG_CMD, struct.pack("=BB", NFQNL_CFG_CMD_BIND, 0) + struct.pack(">H", 0))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, bind, NLM_F_REQUEST | NLM_F_ACK))
    _check_ack(sock)
    params = _attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, params, NLM_F_REQUEST | NLM_F_ACK))
    _check_ack(sock)
    print("ready", flush=True)

    due: list[tuple[float, int]] = []  # (when to accept, packet id): a heap
    while not stop[0]:
        timeout = 0.2 if not due else max(0.0, due[0][0] - time.monotonic())
        try:
            readable, _, _ = select.select([sock], [], [], min(timeout, 0.2))
        except InterruptedError:
            continue
        if readable:
            try:
                data = sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                data = b""
            except OSError:  # ENOBUFS: the kernel dropped notifications (and their packets)
                data = b""
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, _, _ = struct.unpack_from("=IHHII", data, offset)
                if length < 16:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    header = _attrs(data[offset + 20 : offset + length]).get(NFQA_PACKET_HDR)
                    if header is not None:
                        (packet_id,) = struct.unpack_from(">I", header, 0)
                        if random.random() * 100.0 < loss_pct:
                            _verdict(sock, queue, packet_id, NF_DROP)
                        else:
                            wait = delay_ms + random.uniform(-jitter_ms, jitter_ms)
                            when = time.monotonic() + max(0.0, wait) / 1000.0
                            heapq.heappush(due, (when, packet_id))
                offset += (length + 3) & ~3
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, packet_id = heapq.heappop(due)
            _verdict(sock, queue, packet_id, NF_ACCEPT)
    sock.close()


def _verdict(sock: socket.socket, queue: int, packet_id: int, verdict: int) -> None:
    sock.send(
        _message(
            NFQNL_MSG_VERDICT,
            queue,
            _attr(NFQA_VERDICT_HDR, struct.pack(">II", verdict, packet_id)),
        )
    )


def main(argv: list[str]) -> None:
    queue, delay, jitter, loss = int(argv[0]), float(argv[1]), float(argv[2]), float(argv[3])
    run(queue, delay, jitter, loss)


if __name__ == "__main__":
    main(sys.argv[1:])
