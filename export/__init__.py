"""Export stage: `python -m export [build|archive|verify]` (see export/main.py)."""
