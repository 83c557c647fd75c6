"""The producer side: publish commands (send, batch) and replay or inspect parked ones."""
