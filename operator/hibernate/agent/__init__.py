"""The node agent: performs sleep levels 1-4 on the pods of its node."""
