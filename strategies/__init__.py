"""How region updates are combined into the global model."""
