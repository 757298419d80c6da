"""Memory: what a run used (measure.py) and what one will need (plan.py)."""
