"""Batch generation: datasets of samples written as shards plus a manifest (issue 6)."""
