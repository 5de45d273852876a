"""The pf-ray command: its commands and exit codes, bad input through the real entry point, progress bars."""
