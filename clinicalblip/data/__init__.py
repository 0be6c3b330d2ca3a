"""Data: manifest schema, dataset sources, images, checks, the synthetic dataset and the collator."""
