"""The weight gradients of ``project`` (when its input is the wider operand) and of the student's vocabulary head as
before ``transposed``: ``einsum(...).T``, which XLA folds into the product, leaving XLA:CPU a product that contracts
its left operand over the major dimension (not YNNPACK's)."""

from mtp.gemma4 import layers
from mtp.training import loss


def folded():
    committed = layers.transposed, loss.transposed
    layers.transposed = loss.transposed = lambda w: w.T

    def undo():
        layers.transposed, loss.transposed = committed

    return undo


VARIANTS = {"weight gradients folded (before)": folded}
