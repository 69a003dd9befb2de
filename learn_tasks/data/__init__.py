"""Data in: dataset readers, splits, public datasets, synthetic data and Great Expectations validation."""
