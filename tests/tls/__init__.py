"""TLS to the broker (SPEC §9) against private RabbitMQ nodes with real TLS listeners."""
