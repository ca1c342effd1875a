"""Training steps: train, select the best of a search, evaluate against the champion, register."""
