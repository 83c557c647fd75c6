"""The ``sd_notify`` client on its own: addresses, the watchdog period, silence outside systemd."""

from __future__ import annotations

import os
import socket
import uuid

from worker.adapters.systemd import Notifier


def test_outside_systemd_it_sends_nothing_and_has_no_watchdog() -> None:
    notifier = Notifier(environ={"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    notifier.ready("x")
    notifier.watchdog()
    notifier.close()


def test_abstract_socket_and_watchdog_at_half_the_period() -> None:
    name = f"pabx-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier(environ={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "60000000"})
        assert notifier.watchdog_s == 60
        notifier.ready("consuming q")
        assert sock.recv(512) == b"READY=1\nSTATUS=consuming q"
        notifier.watchdog()
        notifier.watchdog()  # within half the period: not sent again
        notifier.stopping()
        assert sock.recv(512) == b"WATCHDOG=1"
        assert sock.recv(512) == b"STOPPING=1\nSTATUS=stopping"
        notifier.close()


def test_watchdog_is_for_the_named_process_only() -> None:
    ours = {"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(environ=ours).watchdog_s == 5
    assert Notifier(environ={**ours, "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier(environ={"WATCHDOG_USEC": "soon"}).watchdog_s is None


def test_a_socket_nobody_reads_is_ignored() -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": "/nonexistent/notify"})
    notifier.ready()  # ENOENT: systemd acts on silence; the worker carries on
    notifier.close()
