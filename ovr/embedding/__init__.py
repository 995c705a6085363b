"""Images -> embeddings: folders and decoding, backbones and their identity, engines, the cache, the loop."""
