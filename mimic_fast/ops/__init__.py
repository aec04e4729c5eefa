"""Backends of the fused ops (see mimic_fast.dispatch for the interface each module implements)."""
