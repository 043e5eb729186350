"""Save and load any drafter family: Gemma 4 drafters as HF ``gemma4_assistant``, the others in mtp's own format.

mtp's format (Medusa, EAGLE-3): a directory with ``config.json`` = ``{"format": "mtp_drafter", "version": 1,
"family": NAME, "config": {the family's config dataclass fields}}`` and ``model.safetensors``, one tensor per
parameter named by its path in the module (``weight``, ``attn.q``, ``mlp.up``, ...), in the module's own layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import safetensors.numpy
from etils import epath
from flax import nnx
from safetensors.numpy import load_file

from mtp.checkpoint.hf_target import local_directory
from mtp.checkpoint.safetensors_io import CheckpointError
from mtp.drafter.families import FAMILIES, GEMMA4
from mtp.drafter.interface import DrafterFamily
from mtp.gemma4.config import Gemma4Config
from mtp.multihost import barrier, host_value

FORMAT, VERSION, WEIGHTS = "mtp_drafter", 1, "model.safetensors"


def family_of(model_dir: str | os.PathLike) -> str:
    """The family a saved drafter directory holds (its config.json's ``family``; HF assistants are ``gemma4``)."""
    path = local_directory(model_dir) / "config.json"  # a remote one is refused, saying how to copy it
    if not path.is_file():
        raise CheckpointError(f"{path}: no config.json; point at a saved drafter directory.")
    config = json.loads(path.read_text())
    if config.get("format") == FORMAT:
        if config.get("family") not in FAMILIES:
            raise CheckpointError(f"{path}: family {config.get('family')!r}; expected one of {sorted(FAMILIES)}.")
        return config["family"]
    return GEMMA4


def save_drafter(drafter: DrafterFamily, model_dir: str | os.PathLike, **kwargs) -> None:
    """Writes ``drafter`` to ``model_dir``: HF layout for the Gemma 4 drafter (``kwargs`` go to it), else ours.

    On many processes every one calls this and process 0 writes; ``model_dir`` may be remote (``gs://...``)."""
    if drafter.family == GEMMA4:
        from mtp.checkpoint.hf_drafter import save_drafter as save_hf

        return save_hf(drafter, model_dir, **kwargs)
    flat = nnx.to_flat_state(nnx.state(drafter, nnx.Param))
    # Every process gathers (parameters may be sharded across processes), one tensor at a time; process 0 writes.
    tensors = {".".join(map(str, path)): host_value(v[...]) for path, v in flat}
    if jax.process_index() == 0:
        model_dir = epath.Path(model_dir)  # gs:// too
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / WEIGHTS).write_bytes(safetensors.numpy.save(tensors))
        document = {"format": FORMAT, "version": VERSION, "family": drafter.family}
        document["config"] = dataclasses.asdict(drafter.config)
        (model_dir / "config.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    barrier("drafter saved")


def load_drafter(
    model_dir: str | os.PathLike,
    *,
    target_config: Gemma4Config | None = None,
    max_draft_len: int | None = None,
    dtype: jnp.dtype | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> DrafterFamily:
    """Any saved drafter, by its family, checked against ``target_config`` when given.

    ``max_draft_len``: the Gemma 4 drafter's (HF does not store it; default 8) and EAGLE-3's (stored; this overrides
    it); Medusa drafts at most its number of heads. ``dtype`` None keeps the saved dtype.
    """
    family = family_of(model_dir)
    if family == GEMMA4:
        from mtp.checkpoint.hf_drafter import load_drafter as load_hf

        return load_hf(model_dir, target_config=target_config, mesh=mesh, dtype=dtype, max_draft_len=max_draft_len or 8)
    model_dir = pathlib.Path(model_dir)
    module_cls, config_cls = FAMILIES[family]
    config = config_cls(**json.loads((model_dir / "config.json").read_text())["config"])
    if max_draft_len is not None and "max_draft_len" in {f.name for f in dataclasses.fields(config)}:
        config = dataclasses.replace(config, max_draft_len=max_draft_len)
    if target_config is not None:
        config.validate_against(target_config)
    tensors = load_file(str(model_dir / WEIGHTS))
    drafter = nnx.eval_shape(lambda: module_cls(config, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(drafter, nnx.Param))
    expected = {".".join(map(str, path)): v for path, v in flat}
    if missing := sorted(set(expected) - set(tensors)):
        raise CheckpointError(f"{model_dir / WEIGHTS}: {len(missing)} tensors missing, e.g. {missing[:5]}.")
    if unexpected := sorted(set(tensors) - set(expected)):
        raise CheckpointError(f"{model_dir / WEIGHTS}: unexpected tensors {unexpected[:5]}; config.json disagrees.")
    for key, variable in expected.items():
        if tensors[key].shape != variable.shape:
            raise CheckpointError(
                f"{model_dir / WEIGHTS}: {key} has shape {tensors[key].shape}, expected {variable.shape}."
            )
        variable.set_value(jnp.asarray(tensors[key], dtype or tensors[key].dtype))
    return drafter
