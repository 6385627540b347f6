"""AnnData loading, condition parsing, splits, DE genes and synthetic data."""
