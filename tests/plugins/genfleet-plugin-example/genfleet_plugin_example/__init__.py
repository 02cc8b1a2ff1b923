"""An example genfleet plugin family (see factorized.py)."""
