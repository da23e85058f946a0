"""Training, conversion and evaluation scripts (may import core; core never imports training)."""
