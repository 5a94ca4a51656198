"""Shard builders and the Ray Data pipeline that feeds training and evaluation."""
