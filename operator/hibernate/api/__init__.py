"""The contract: API types, sleep levels, and every label and annotation key, apart from controllers."""
