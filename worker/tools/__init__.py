"""Tools beside the worker: the PABX simulator, the demo, fakes and an in-memory broker."""
