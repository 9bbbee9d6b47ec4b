"""The coordinator: ServerApp wiring, central evaluation, checkpoints and export."""
