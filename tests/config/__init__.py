"""The experiment config (strict loading, fuzzing), the example YAMLs, the run files (atomic writes, config.yaml)."""
