"""Training data: ``datasets`` sources, the Gemma 4 chat template, tokenizers, packing and the grain pipeline.

``sources.load_rows`` -> ``chat.ChatTemplate`` (on ``tokenizer.load_tokenizer``) -> ``pipeline.make_train_iterator``
/ ``make_eval_batches`` (which pack with ``packing``). The embedded default's corpus lives in
``mtp.embedded``.
"""
