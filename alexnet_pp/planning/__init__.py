"""Predicting a layout's throughput before running it (see simulate.py for the schedule model)."""
