"""The experiment config (strict loading, fuzzing), the example YAMLs, and the run files (atomic writes, config.yaml)."""
