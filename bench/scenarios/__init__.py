"""The bench's scenarios, one object (and module) each; ``run(ctx)`` gives its typed result.

Every process that does the job runs on its own: the PABX simulator
(``python -m worker simulate``), the worker (``python -m worker run`` configured through
``PABX_WORKER_*``), and the peers (``python -m bench.peers``). This process only publishes
commands, reads outcome events and samples the others with psutil, so every number includes
real IPC (AMQP and HTTP over loopback).

Scenarios (each on a private topology whose names start with ``bench.<prefix>.``, deleted
afterwards, and a private key prefix in the idempotency store, removed afterwards):

:class:`Drain`
    ``N`` valid commands are published to the commands exchange *before* the consumer
    starts; then the consumer (the worker, one or more processes, or a peer) drains the queue.
    Throughput = outcomes / (last outcome - first outcome), both times taken by the same
    outcome reader (a pika consumer of the results exchange, in a thread of this process).
    Latencies: publish → PABX request (``issued_at`` of the command vs ``received_at`` that
    the simulator recorded, ms resolution) and publish → outcome (vs the reader's arrival
    time). In a drain both are dominated by the time spent queued; they are reported anyway.
:class:`Paced`
    The worker already consuming; commands published at a fixed rate (half of the worker's
    drain throughput at that latency, measured earlier in the same run). Here publish → PABX
    request is the latency the worker *adds* (queue + prepare + thread hand-off + store claim
    + HTTP client), the issue's "p99 ≤ 10 ms at half of the maximum rate".
:class:`Idle`
    RSS of each consumer process a few seconds after it started consuming an empty queue.
:class:`Batch`
    ``worker.produce.producer.Producer.publish`` (pipelined publisher confirms) of many commands;
    commands/s from the call to the last confirm.
:class:`Soak`
    The worker drains ``N`` commands in chunks; RSS after each chunk (is it flat?).
"""

from __future__ import annotations

from bench.scenarios.batch import Batch
from bench.scenarios.drain import Drain
from bench.scenarios.idle import Idle
from bench.scenarios.paced import Paced
from bench.scenarios.soak import Soak

__all__ = ["Batch", "Drain", "Idle", "Paced", "Soak"]
