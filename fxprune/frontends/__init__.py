"""Capture front ends: torch.fx tracing with shape propagation, and capture in parts."""
