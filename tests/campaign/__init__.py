"""Long-running fault campaign: runner (runner.py), recorded history (history.py), checker."""
