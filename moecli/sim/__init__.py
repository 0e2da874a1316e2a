"""Trace-driven simulation of hybrid MoE inference (traces, discrete-event timelines)."""
