"""Infrastructure without Lightning: collectives that degrade to no-ops in one process, checkpoints,
result tables, resuming, logging, the allocator settings and the config location."""
