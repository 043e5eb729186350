"""The drafter's query, pre- and post-projections as plain einsums, as before e89b859 sent them through ``project``
(whose backward never transposes the [B, T, F] gradient)."""

import jax.numpy as jnp

from mtp.drafter import model as drafter_model
from mtp.gemma4 import attention
from mtp.gemma4.layers import apply_rope


def einsum_queries(self, x_BTD, cos_BTH, sin_BTH):
    q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.q[...].astype(x_BTD.dtype))
    return apply_rope(self.q_norm(q_BTNH), cos_BTH, sin_BTH)


def before_e89b859():
    committed = drafter_model.project, attention.Attention.queries
    drafter_model.project = lambda x_BTD, w_DF: jnp.einsum("BTD,DF->BTF", x_BTD, w_DF)
    attention.Attention.queries = einsum_queries

    def undo():
        drafter_model.project, attention.Attention.queries = committed

    return undo


VARIANTS = {"projections before e89b859": before_e89b859}
