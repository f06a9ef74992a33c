"""Model-agnostic jitted primitives on a device mesh.

Modules: `mesh` (mesh, sharding, multi-host), `streaming` (fixed-size chunk streams),
`accumulators` (init/update/merge/finalize statistics), `train` (the train loop),
`checkpoint` (orbax), `metrics_io` (metrics.jsonl), `bench` (benchmark helper),
`checks` (one-line input errors). `engine` never imports `models` or `experiments`.
"""
