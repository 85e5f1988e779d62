"""BIDS-aware workflows composing the tasks (see DESIGN.md)."""
