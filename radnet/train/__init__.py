"""Training loops, losses, sharding and checkpointing."""
