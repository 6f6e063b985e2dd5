"""Corpus preparation: raw corpora -> unified record shards -> memory-mapped token files."""
