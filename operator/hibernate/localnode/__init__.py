"""A node on this machine without Kubernetes' kubelet: pods as namespaced processes (demo and tests).

Production never uses this package. It plays the kubelet where none runs (this project's CI and the
local demo), so that the operator and the agent act on real processes in real pod-like cgroups.
"""
