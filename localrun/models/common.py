"""Pieces every family's checkpoint layout shares."""

from __future__ import annotations


def sanitize(args, name: str) -> str | None:
    """Checkpoint key -> model key (the weight prefix stripped), or None for tensors a text decoder
    never reads (vision and audio towers, a tied model's lm_head copy)."""
    if name == "lm_head.weight":
        return None if args.tie_word_embeddings else name
    if not name.startswith(args.weight_prefix):
        return None
    return name[len(args.weight_prefix):]
