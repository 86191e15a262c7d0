"""hibernate: a Kubernetes operator that puts GPU model servers to sleep and wakes them."""

__version__ = "0.1.0"
