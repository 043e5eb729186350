"""The embedded default: a corpus made from this machine's Python standard library, its tokenizer, and the tiny
Gemma 4 target pretrained on it (``corpus.ensure_embedded_dataset``, ``target.ensure_tiny_target``)."""
