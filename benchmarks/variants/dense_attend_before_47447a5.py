"""``dense_attend`` as it was before 47447a5: its few-queries products ([B, T, K, G, H], unchanged since) for any
number of queries."""

import sys

from mtp.gemma4 import attention


def before_47447a5():
    committed = attention.MANY_QUERIES
    attention.MANY_QUERIES = sys.maxsize
    return lambda: setattr(attention, "MANY_QUERIES", committed)


VARIANTS = {"dense_attend before 47447a5": before_47447a5}
