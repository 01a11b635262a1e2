"""Training stage: `python -m train` (see train/main.py)."""
