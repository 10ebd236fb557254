"""Infrastructure without Lightning: collectives that degrade to no-ops in one process, checkpoints."""
