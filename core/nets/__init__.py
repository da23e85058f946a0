"""Network definitions (pure PyTorch, official-compatible state-dict names)."""
