"""The worker side: consume, decide, pace, call the PABX, publish outcomes."""
