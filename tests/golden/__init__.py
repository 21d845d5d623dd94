"""The golden trajectory (see regenerate.py)."""
