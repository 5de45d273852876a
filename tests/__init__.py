"""pf-ray's tests, one folder per area of the code (see the README's Tests section)."""
