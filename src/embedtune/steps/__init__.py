"""One module per pipeline step, each with `run(cfg) -> dict`."""
