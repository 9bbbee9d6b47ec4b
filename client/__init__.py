"""A region's process: ClientApp wiring, DP local training, the client half of secure aggregation."""
