"""Paper reproductions on an absl launcher: `python -m experiments.main --config=... --workdir=...`."""
