"""One module per experiment task; each exposes `run(config, workdir) -> dict`."""
