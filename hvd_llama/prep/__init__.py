"""Raw text to token shards: cleaning, reading corpora, encoding, the shard file format."""
