"""ganserve on Ray Serve: one deployment per model whose replicas run the project's own registry,
batcher and pipeline, behind one HTTP ingress with the same /v1 and /v2 API (docs/ray.md).

Only `deployments.py` and `cli.py` (inside its command) import ray; `config.py`, `routing.py`,
`forwarding.py` and `metrics_board.py` do not, so the plan can be checked where ray is absent."""
