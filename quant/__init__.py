"""4-bit expert weights (bitsandbytes NF4/FP4) packed one contiguous buffer per expert."""
