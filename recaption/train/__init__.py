"""The contrastive trainer (`recaption train`): LoTLIP corner tokens, DreamLIP sub-captions, Holistic CLIP branches."""
