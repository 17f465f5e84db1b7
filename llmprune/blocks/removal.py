"""Remove whole Transformer blocks so that the result is an ordinary, smaller model of the same architecture:
blocks deleted from their ModuleList, the remaining blocks' `layer_idx` renumbered (the KV cache is indexed by
it), and the config's layer count and per-layer settings rewritten, so that `save_pretrained` +
`from_pretrained` rebuilds exactly the pruned model.

Config fields rewritten (on the text config), when present:

* the layer count: `num_hidden_layers` (GPT-2 `n_layer`, others `num_layers`);
* every top-level list as long as the old layer count (`layer_types` of Gemma 2/3, Qwen 2/3, Mistral-style
  sliding windows, `mlp_layer_types`, Llama 4 `no_rope_layers`...): the removed entries are dropped;
* lists of layer indices (`mlp_only_layers`, `moe_layers`): removed indices dropped, the others renumbered;
* "the first m layers" counts (`max_window_layers`, `first_k_dense_replace`) below the layer count: m becomes
  the number of kept blocks among the first m;
* periods from which `layer_types` was derived (`sliding_window_pattern` and Gemma 3's `_sliding_window_pattern`:
  layer i is full attention when (i + 1) % p == 0): when the kept layers no longer follow p, p becomes the
  smallest period they follow, or None when they follow none (`layer_types`, always saved, then says it all).

Token-id lists (`eos_token_id`...) and `architectures` are never treated as per-layer. Before anything changes,
a model built from the rewritten config on the meta device must have exactly the parameter names and shapes
of the pruned model, its config must survive a `to_dict`/`from_dict` round trip with the rewritten per-layer
lists, and every kept block must get the same attention settings (`attention_type`, `is_sliding`,
`sliding_window`...) as it has now; otherwise the removal is refused (the architecture derives its structure from
layer indices in a way not covered above).
"""

from __future__ import annotations

import copy
import logging
from typing import Iterable

import torch
from torch import nn

from ..errors import LLMPruneError
from ..models.arch import Blocks, find_blocks

log = logging.getLogger(__name__)

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
INDEX_LIST_KEYS = ("mlp_only_layers", "moe_layers")
PREFIX_COUNT_KEYS = ("max_window_layers", "first_k_dense_replace")
PERIOD_KEYS = ("sliding_window_pattern", "_sliding_window_pattern")
# Per-layer attention settings that a block reads from the config when it is built (compared after a rebuild).
ATTENTION_ATTRS = ("attention_type", "layer_type", "is_sliding", "sliding_window", "use_rope", "is_causal")


def normalize_indices(indices: Iterable[int], n: int, what: str = "block") -> list[int]:
    """Sorted distinct indices in [0, n); negative ones count from the end, as in Python."""
    out = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise LLMPruneError(f"{what} indices must be integers, got {i!r}")
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise LLMPruneError(f"{what} index {i} is out of range: the model has {n} blocks (0..{n - 1})")
        out.add(j)
    return sorted(out)


def text_config_of(config):
    """The decoder's config (the config itself for a plain causal LM)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_removable(model: nn.Module) -> Blocks:
    """The model's blocks, or an LLMPruneError when blocks of this model cannot be removed."""
    blocks = find_blocks(model)
    cfg = text_config_of(model.config)
    arch = type(model).__name__
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise LLMPruneError(
            f"{arch} scales attention by 1/(layer index + 1) (scale_attn_by_inverse_layer_idx=True): removing "
            "blocks would change the blocks after them; block removal is not supported for this model"
        )
    if getattr(cfg, "is_heterogeneous", False):
        raise LLMPruneError(f"{arch} has a per-layer config (per_layer_config); block removal does not support it yet")
    return blocks


def _is_per_layer_list(key: str, value, n: int) -> bool:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return False
    return not (key == "architectures" or "token" in key or key.endswith(("_id", "_ids")))


def _follows_period(types, p) -> bool:
    """Whether `types` are what period `p` gives: "full_attention" at layers i with (i + 1) % p == 0, else sliding."""
    if not isinstance(p, int) or isinstance(p, bool) or p < 1 or not isinstance(types, (list, tuple)):
        return False
    return all(t == ("full_attention" if (i + 1) % p == 0 else "sliding_attention") for i, t in enumerate(types))


def sliding_period(types) -> int | None:
    """The smallest period p that `types` (a layer_types list) follow, or None when they follow none."""
    return next((p for p in range(1, len(types) + 2) if _follows_period(types, p)), None)


def plan_config_updates(cfg, n: int, kept: list[int]) -> dict[str, tuple]:
    """key -> (before, after) for every config field that depends on the blocks (see the module docstring)."""
    updates: dict[str, tuple] = {}
    new_index = {old: new for new, old in enumerate(kept)}
    attribute_map = getattr(cfg, "attribute_map", {}) or {}
    for key in LAYER_COUNT_KEYS:
        real = attribute_map.get(key, key)
        if real not in updates and getattr(cfg, real, None) == n:
            updates[real] = (n, len(kept))
    data = cfg.to_dict()
    for key in sorted(data):
        if key in updates:
            continue
        value = getattr(cfg, key, data[key])
        if key in INDEX_LIST_KEYS and isinstance(value, (list, tuple)):
            updates[key] = (value, type(value)(new_index[i] for i in value if i in new_index))
        elif key in PREFIX_COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool) and value < n:
            updates[key] = (value, sum(1 for i in kept if i < value))  # a count >= n covers every block: kept
        elif _is_per_layer_list(key, value, n):
            updates[key] = (value, type(value)(value[i] for i in kept))
    types = getattr(cfg, "layer_types", None)
    new_types = updates.get("layer_types", (None, types))[1]
    for key in PERIOD_KEYS:
        p = getattr(cfg, key, None)
        if _follows_period(types, p) and not _follows_period(new_types, p):  # a period that no longer holds
            updates[key] = (p, sliding_period(new_types))
    return {k: v for k, v in updates.items() if v[0] != v[1]}


def _apply_config_updates(cfg, updates: dict[str, tuple]) -> None:
    for key, (_, after) in updates.items():
        setattr(cfg, key, copy.deepcopy(after))


def _renamed_state_shapes(model: nn.Module, blocks: Blocks, kept: list[int]) -> dict[str, tuple]:
    """Parameter/buffer names and shapes the pruned model will have (kept blocks renumbered)."""
    prefix = blocks.path + "."
    new_index = {str(old): str(new) for new, old in enumerate(kept)}
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith(prefix):
            idx, _, rest = name[len(prefix):].partition(".")
            if idx not in new_index:
                continue
            name = f"{prefix}{new_index[idx]}.{rest}"
        out[name] = tuple(t.shape)
    return out


def _attention_settings(block: nn.Module) -> dict[str, object]:
    """{module.attr: value} of the per-layer attention settings (`ATTENTION_ATTRS`) of one block's modules."""
    out = {}
    for name, module in block.named_modules():
        for attr in ATTENTION_ATTRS:
            v = vars(module).get(attr, ...)  # set on the module itself, not a method or class default
            if v is None or isinstance(v, (str, int, float, bool)):
                out[f"{name}.{attr}" if name else attr] = v
    return out


def check_reloadable(model: nn.Module, blocks: Blocks, kept: list[int], updates: dict[str, tuple]) -> None:
    """Refuse a removal after which `from_pretrained` would build another model: other parameter shapes, a config
    whose per-layer fields change on reload, or kept blocks with other attention settings than they have now."""
    removed = sorted(set(range(len(blocks))) - set(kept))
    edited = copy.deepcopy(model.config)
    _apply_config_updates(text_config_of(edited), updates)
    try:
        new_config = type(edited).from_dict(edited.to_dict())  # what config.json gives back
        with torch.device("meta"):
            fresh = type(model)(new_config)
    except Exception as e:  # noqa: BLE001 - turned into one actionable line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LLMPruneError(
            f"{type(model).__name__} cannot be rebuilt from its config with blocks {removed} "
            f"removed ({first}); block removal is not supported for this model"
        ) from None
    reloaded = text_config_of(new_config)
    for key, (_, after) in updates.items():
        if isinstance(after, (list, tuple)) and list(getattr(reloaded, key, None) or []) != list(after):
            raise LLMPruneError(
                f"{type(model).__name__} with blocks {removed} removed: the config's {key} would not reload as "
                f"rewritten ({list(after)!r} saved, {getattr(reloaded, key, None)!r} loaded); block removal is not "
                "supported for this model"
            )
    fresh_blocks = find_blocks(fresh).modules
    for j, i in enumerate(kept):
        have, get = _attention_settings(blocks.modules[i]), _attention_settings(fresh_blocks[j])
        if have != get:
            key = next(k for k in sorted(set(have) | set(get)) if have.get(k) != get.get(k))
            raise LLMPruneError(
                f"{type(model).__name__} with blocks {removed} removed: block {i} (then {j}) would reload with "
                f"{key}={get.get(key)!r} instead of {have.get(key)!r}; block removal is not supported for this model"
            )
    want = _renamed_state_shapes(model, blocks, kept)
    got = {name: tuple(t.shape) for name, t in fresh.state_dict().items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise LLMPruneError(
            f"{type(model).__name__} with blocks {removed} removed would not reload "
            f"as saved (first difference: {diff[0]}); its config derives the block structure from layer indices in "
            "a way llmprune does not rewrite; remove other blocks or use another model"
        )



def num_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def remove_blocks(model: nn.Module, indices: Iterable[int]) -> dict:
    """Delete the blocks `indices` (original numbering; negative counts from the end) from `model`, in place.

    Returns what changed: removed and kept indices, block counts, parameter counts, and the config fields
    rewritten as {key: {"before": ..., "after": ...}}. Nothing changes when the removal is refused."""
    blocks = check_removable(model)
    n = len(blocks)
    removed = normalize_indices(indices, n)
    if len(removed) >= n:
        raise LLMPruneError(f"cannot remove {len(removed)} of {n} blocks: at least one block must stay")
    kept = [i for i in range(n) if i not in set(removed)]
    cfg = text_config_of(model.config)
    updates = plan_config_updates(cfg, n, kept)
    params_before = num_params(model)
    if removed:
        check_reloadable(model, blocks, kept, updates)
        for i in reversed(removed):
            del blocks.modules[i]
        for new, block in enumerate(blocks.modules):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new
        _apply_config_updates(cfg, updates)
        log.info("removed blocks %s of %d; config: %s", removed, n,
                 ", ".join(f"{k} {b!r} -> {a!r}" for k, (b, a) in updates.items()))
    return {"removed": removed, "kept": kept, "num_blocks_before": n, "num_blocks_after": len(kept),
            "params_before": params_before, "params_after": num_params(model),
            "config_updates": {k: {"before": b, "after": a} for k, (b, a) in updates.items()} if removed else {}}
