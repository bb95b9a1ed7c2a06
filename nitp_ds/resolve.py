"""Every fact of a run derived from the recipe, once: `resolve_run(cfg, ds_raw, world_size, data) -> ResolvedRun`.

The Hugging Face config (from the recipe's shape or model.pretrained), the vocabulary size, the NITP target
layer (its default and its range check) and the completed DeepSpeed config are derived here and nowhere else:
the trainer, `nitp train --print-config`, evaluation and the checkpoint meta all read a ResolvedRun. Importing
this module is light (transformers and the data reader are imported by the calls that need them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nitp_ds.config import Config
from nitp_ds.errors import NITPError

# The vocabulary `--print-config` shows a recipe model with when neither model.vocab_size nor readable data
# gives one; training always reads the data's.
PLACEHOLDER_VOCAB = 32000


@dataclass(frozen=True)
class ResolvedRun:
    hf_config: Any  # transformers.PretrainedConfig of the model to train
    vocab_size: int
    target_layer: int  # k: the NITP target is the output of the first k decoder layers (0 = embeddings)
    num_experts: int
    ds_config: dict[str, Any]  # the ds_config file completed from the recipe, as the engine gets it
    world_size: int

    @property
    def autoep_size(self) -> int | None:
        return self.ds_config.get("expert_parallel", {}).get("autoep_size")


def default_target_layer(num_layers: int) -> int:
    """The paper's choice, about 20% of depth (3/16, 4/17, 5/24), never the embeddings."""
    return max(1, round(0.2 * num_layers))


def resolve_target_layer(cfg: Config, num_layers: int) -> int:
    """nitp.target_layer, or its default, checked against the model's depth."""
    k = cfg.nitp.target_layer if cfg.nitp.target_layer is not None else default_target_layer(num_layers)
    if not 0 <= k < num_layers:
        if cfg.model.pretrained is not None:
            raise NITPError(f"nitp.target_layer ({k}) must be in [0, {num_layers - 1}] "
                            f"for the {num_layers}-layer model in {cfg.model.pretrained}")
        raise NITPError(f"nitp.target_layer ({k}) must be in [0, {num_layers - 1}] for a "
                        f"{num_layers}-layer model (0 = embedding output)")
    return k


def check_pretrained_fits(hf_config, cfg: Config, data) -> None:
    """A model.pretrained directory brings its own vocabulary and context length; the data must fit both."""
    where = cfg.model.pretrained
    if data.vocab_size > hf_config.vocab_size:
        raise NITPError(f"model.pretrained {where} has a vocabulary of {hf_config.vocab_size} tokens but the data in "
                        f"{cfg.data.path} uses {data.vocab_size}; prepare the data with that model's tokenizer "
                        "(nitp prepare-data --tokenizer DIR)")
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and cfg.data.seq_len > limit:
        raise NITPError(f"data.seq_len ({cfg.data.seq_len}) exceeds the {limit} positions of model.pretrained "
                        f"{where}; lower data.seq_len")


def resolve_run(cfg: Config, ds_raw: dict[str, Any], world_size: int, data=None) -> ResolvedRun:
    """The derived facts of training `cfg` on `data` (an opened data directory) over `world_size` ranks.

    The data must fit the model (vocabulary, positions). `data` None (only `--print-config` without readable
    data): a recipe model then takes model.vocab_size, or PLACEHOLDER_VOCAB when that is 0.
    """
    from nitp_ds.ds_config import derive_ds_config
    from nitp_ds.models import build_hf_config, load_pretrained_config, num_experts

    if cfg.model.pretrained:
        hf_config = load_pretrained_config(cfg.model.pretrained)
        vocab_size = hf_config.vocab_size
        if data is not None:
            from nitp_ds.models.pretrained import check_pretrained_weights

            check_pretrained_fits(hf_config, cfg, data)
            check_pretrained_weights(cfg.model.pretrained, hf_config)  # shards, names, shapes: before any write
    else:
        if data is not None:
            from nitp_ds.data.dataset import check_vocab

            vocab_size = cfg.model.vocab_size or data.vocab_size
            check_vocab(data, vocab_size)
        else:
            vocab_size = cfg.model.vocab_size or PLACEHOLDER_VOCAB
        hf_config = build_hf_config(cfg.model, vocab_size)
    experts = num_experts(hf_config)
    ds_config = derive_ds_config(ds_raw, cfg, world_size=world_size, num_experts=experts,
                                 model_type=hf_config.model_type)
    target_layer = resolve_target_layer(cfg, hf_config.num_hidden_layers)
    return ResolvedRun(hf_config=hf_config, vocab_size=vocab_size, target_layer=target_layer, num_experts=experts,
                       ds_config=ds_config, world_size=world_size)
