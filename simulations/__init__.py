"""Running many regions on one machine with Flower's simulation engine."""
