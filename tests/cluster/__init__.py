"""A throw-away local RabbitMQ cluster (three private nodes) and the worker's failover test."""
