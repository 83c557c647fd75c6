"""The channel protocols: py-amqp/kombu (the real path) and the memory broker satisfy them.

mypy cannot check kombu and py-amqp (they are untyped): here every protocol method is bound,
as the worker calls it, to the real method's signature.
"""

from __future__ import annotations

import inspect
from typing import Any
from unittest import mock

import amqp.channel
import pytest
from kombu import Connection

from worker.adapters.channel import AmqpChannel, AmqpConnection
from worker.tools.memory_broker import MemoryChannel, MemoryConnection


def protocol_methods(protocol: type) -> list[str]:
    return [
        name
        for name, value in vars(protocol).items()
        if inspect.isfunction(value) and not name.startswith("_")
    ]


def call_shape(function: Any) -> tuple[list[str], dict[str, None]]:
    """Positional and keyword arguments as the protocol has them (self left out)."""
    params = list(inspect.signature(function).parameters.values())[1:]
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    keywords = {p.name: None for p in params if p.kind is p.KEYWORD_ONLY}
    return positional, keywords


@pytest.mark.parametrize(
    ("protocol", "real"),
    [
        (AmqpChannel, amqp.channel.Channel),
        (AmqpConnection, Connection),
        (AmqpChannel, MemoryChannel),
        (AmqpConnection, MemoryConnection),
    ],
    ids=["py-amqp-channel", "kombu-connection", "memory-channel", "memory-connection"],
)
def test_every_protocol_call_binds_to_the_implementation(protocol: type, real: type) -> None:
    methods = protocol_methods(protocol)
    assert methods
    for name in methods:
        positional, keywords = call_shape(getattr(protocol, name))
        target = inspect.signature(getattr(real, name))
        target.bind(None, *positional, **keywords)  # raises TypeError if it would not


def test_a_py_amqp_channel_has_the_protocol_attributes() -> None:
    connection = mock.MagicMock(channels={})
    channel = amqp.channel.Channel(connection, 1)
    assert isinstance(channel.events["basic_ack"], set)
    assert isinstance(channel.auto_decode, bool)
