"""A checkpoint manager's adapter export, in the shape an RL framework has one (verl's, say)."""
