"""Fused loss epilogues on the pair engine (see docs/ENGINE.md)."""
