"""Model and data shared by the coordinator (server/) and the regions (client/)."""
