"""Several guardd nodes, one decision: coordination through etcd (`coordinator.Fleet`)."""
