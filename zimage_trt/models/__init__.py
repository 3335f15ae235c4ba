"""The three networks (own compact definitions), checkpoint key maps and tiny models."""
