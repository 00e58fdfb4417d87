"""Shipped demo tasks: deterministic generators of training and held-out records, so `lorakit train`
runs end to end with no data at hand."""
