"""Training and what a trial is made of: fit/evaluate, candidates, checkpoints, hooked forwards, metrics."""
