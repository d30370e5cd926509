"""The Kubeflow layer: the DAG (`pipeline`), cluster settings (`cluster`), presets, compile / demo / submit."""
