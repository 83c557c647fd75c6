"""The shared contract: commands, outcome events, topology names, settings, schemas, errors."""
