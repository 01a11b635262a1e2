"""Export stage: `python -m export [build|archive|quantize|ort|verify|keys]` (see export/main.py)."""
