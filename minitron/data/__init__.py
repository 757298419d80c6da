"""Corpus loading, tokenizers, packing into blocks, and the resumable sampler."""
