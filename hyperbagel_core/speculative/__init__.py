"""Speculative decoding for BAGEL's text output (issue 3): draft head, drafters, draft-and-verify loop."""
from .accept import acceptance_on_device, greedy_accept_on_device, speculative_accept
from .decode import DEFAULT_DRAFT_TOKENS, AdaptiveDraftLength, SpecResult, speculative_generate
from .draft_head import DraftHead, DraftHeadConfig, default_feature_layers
from .draft_io import load_draft_head, save_draft_head, target_fingerprint
from .drafters import DraftHeadDrafter, OracleDrafter
from .prompt_lookup import PromptLookupDrafter

__all__ = ["AdaptiveDraftLength", "DEFAULT_DRAFT_TOKENS", "DraftHead", "DraftHeadConfig", "DraftHeadDrafter",
           "OracleDrafter", "PromptLookupDrafter", "SpecResult", "acceptance_on_device", "default_feature_layers",
           "greedy_accept_on_device",
           "load_draft_head", "save_draft_head", "speculative_accept", "speculative_generate",
           "target_fingerprint"]
