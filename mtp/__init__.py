"""mtp: train and evaluate Gemma-4-style multi-token-prediction drafters for speculative decoding.

Dimension letters, used in einsum strings and in variable names (``x_BTD``, ``k_BKSH``):

    B batch            T query length (new tokens)     S key / cache length
    D model width      N query heads                   K key-value heads
    H head dim         F feed-forward width            V vocabulary
    P draft length     L layers                        E experts
    C centroids        G per-layer-embedding width

Packages: ``mtp.gemma4`` (the frozen Gemma 4 decoder), ``mtp.checkpoint`` (Hugging Face safetensors I/O),
``mtp.drafter`` (MTP drafter heads), ``mtp.decoding`` (speculative decoding), ``mtp.training`` (distillation).
"""
