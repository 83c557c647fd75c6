"""The one test kit: imported by the unit, integration, chaos, cluster, TLS and campaign tests
and by the bench, so each part is written once.

``samples``
    The vendor example body, sample commands and command ids.
``topology``
    Private topology names (settings on unique names) and declaring / deleting them.
``events``
    A pika peer that publishes commands and reads outcome events.
``processes``
    The simulator's admin API, the worker in a thread or a process, its environment, and the
    private RabbitMQ nodes of :mod:`tests.cluster.rabbit_cluster`.
"""
